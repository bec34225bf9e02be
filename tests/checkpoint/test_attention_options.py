"""The attention options released families need (a short conv over q/k/v, partial rotary, biases, a softmax
scale) keep the streaming engine equal to the chunked sleep forward: the conv history is short-term
memory, evicted and restarted like the KV cache (hard and sliding eviction, N = 2)."""

from __future__ import annotations

import pytest
import torch

from megasleep.inference import generate
from megasleep.sleep import SleepConfig
from tests.conftest import tiny_model
from tests.inference.test_generate import PROMPTS, greedy_reference

OPTIONS = dict(n_heads=4, n_kv_heads=2, d_conv=4, rotary_dim=4, qkv_bias=True, out_bias=True, softmax_scale=0.3)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_streaming_equals_chunked_forward_with_attention_options(eviction):
    model = tiny_model("AMAG", attn=OPTIONS).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases away from zero
            p.add_(0.05 * torch.randn_like(p))
        cfg = SleepConfig(window=4, passes=2, eviction=eviction)
        res = generate(model, PROMPTS[:2], 5, sleep=cfg, temperature=0)
        assert res.tokens == [greedy_reference(model, p, 5, cfg) for p in PROMPTS[:2]]


def test_conv_changes_the_function_and_the_cache_holds_its_history():
    a = tiny_model("A", attn=OPTIONS).eval()
    ids = torch.randint(0, 61, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = a(ids)
        a.layers[0].mixer.qkv_conv1d.weight.mul_(2.0)
        assert not torch.allclose(before, a(ids))
    cache = a.init_caches(1)[0]
    from megasleep.models.cache import MixContext

    with torch.no_grad():
        _, new = a.layers[0].mixer(torch.randn(1, 5, 32, dtype=torch.float64), cache, MixContext.for_span(0, 5, 8))
    assert new.conv is not None and new.conv[0].shape == (1, (4 + 2 * 2) * 8, 3)
