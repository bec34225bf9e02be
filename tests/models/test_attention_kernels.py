"""Attention on fast kernels: the plain-causal path (no mask, ``is_causal``), FlexAttention's block
mask for sliding windows and documents, and cached RoPE tables -- each equal to the simple
explicit-mask reference in outputs and gradients, on fresh random inputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from megasleep.models.attn_kernels import attend, flex_masked, masked_reference
from megasleep.models.cache import MixContext
from megasleep.models.rope import RopeCache, rope
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model


def qkv(b, h, hk, tq, tk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, t, d, generator=g, dtype=dtype).requires_grad_()
            for n, t in ((h, tq), (hk, tk), (hk, tk))]


def fwd_bwd(fn, tensors):
    out = fn(*tensors)
    out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype))
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


def assert_same(ref, got, tol):
    torch.testing.assert_close(got[0], ref[0], rtol=tol, atol=tol)
    for a, b in zip(ref[1], got[1]):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_plain_causal_equals_masked_reference(heads, dtype, tol):
    h, hk = heads
    t = 19
    tensors = qkv(2, h, hk, t, t, 8, dtype, seed=h + t)
    pos = torch.arange(t)
    ref = fwd_bwd(lambda q, k, v: masked_reference(q, k, v, pos, pos, window=t), tensors)
    got = fwd_bwd(lambda q, k, v: attend(q, k, v, pos, pos, t, None, None, plain_causal=True), tensors)
    assert_same(ref, got, tol)


@pytest.mark.parametrize("case", ["band", "band+cache", "doc", "doc+cache+gqa"])
def test_flex_block_mask_equals_masked_reference(case):
    """FlexAttention (eager on CPU: exact, unfused) with the block mask == the explicit mask. Flex has
    no backward on CPU, so the gradients are compared in tests/gpu/test_attention_cuda.py."""
    prefix = 5 if "cache" in case else 0
    h, hk = (4, 2) if "gqa" in case else (2, 2)
    tq, window = 13, 6
    tensors = qkv(2, h, hk, tq, prefix + tq, 8, torch.float64, seed=len(case))
    q_pos = torch.arange(prefix + 3, prefix + 3 + tq)
    k_pos = torch.arange(3, prefix + 3 + tq)
    q_doc = k_doc = None
    if "doc" in case:
        g = torch.Generator().manual_seed(1)
        k_doc = torch.cumsum(torch.rand(2, prefix + tq, generator=g) < 0.2, 1)
        q_doc = k_doc[:, prefix:]
    q, k, v = (t.detach() for t in tensors)
    ref = masked_reference(q, k, v, q_pos, k_pos, window, q_doc, k_doc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile"
        got = flex_masked(q, k, v, q_pos, k_pos, window, q_doc, k_doc, compiled=False)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def _record_sdpa(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kw):
        calls.append((kw.get("attn_mask"), kw.get("is_causal", False)))
        return real(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


def test_training_windows_pass_no_mask(monkeypatch):
    """Hard eviction, no documents: every attention call of a training step is plain causal, so
    SDPA gets ``is_causal=True`` and no materialised mask (the math kernel is never forced)."""
    calls = _record_sdpa(monkeypatch)
    model = tiny_model("AGMA")
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    sleep_forward(model, ids, SleepConfig(window=8, passes=2)).loss.backward()
    assert calls and all(mask is None and causal for mask, causal in calls)


def test_masked_cases_still_get_their_mask(monkeypatch):
    calls = _record_sdpa(monkeypatch)
    model = tiny_model("AGMA")
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    sleep_forward(model, ids, SleepConfig(window=8, eviction="sliding"))
    assert any(mask is not None for mask, _ in calls)  # windows after the first see cached keys
    calls.clear()
    docs = torch.zeros(2, 20, dtype=torch.long)
    docs[:, 5:] = 1
    sleep_forward(model, ids, SleepConfig(window=8), doc_ids=docs)
    assert calls and all(mask is not None for mask, _ in calls)


def test_rope_tables_are_cached_and_exact():
    cache = RopeCache(head_dim=16, theta=10000.0)
    x = torch.randn(2, 3, 7, 16)
    for start in (0, 5, 100, 3000):
        pos = torch.arange(start, start + 7)
        assert torch.equal(cache(x, pos, (start, start + 7)), rope(x, pos, 10000.0))
    table = cache.tables(10, x.device, torch.float32)[0]
    cache(x, torch.arange(7), (0, 7))
    assert cache.tables(10, x.device, torch.float32)[0] is table  # not rebuilt per call
    assert cache.tables(3007, x.device, torch.float32)[0].shape[0] == 4096
    x64 = x.double()
    torch.testing.assert_close(cache(x64, torch.arange(4, 11), (4, 11)), rope(x64, torch.arange(4, 11), 10000.0),
                               rtol=0, atol=0)


def test_attention_module_equals_reference_formula():
    """The whole mixer on the fast path == uncached RoPE + explicit causal mask (previous code)."""
    model = tiny_model("A", n_prelude=0)
    attn = model.layers[0].mixer
    x = torch.randn(2, 11, model.config.d_model, dtype=torch.float64, requires_grad=True)
    y, _ = attn(x, model.init_caches(2)[0], MixContext.for_span(3, 14, 16))
    B, T, _ = x.shape
    pos = torch.arange(3, 14)
    q = rope(attn.q_proj(x).view(B, T, 4, -1).transpose(1, 2), pos, attn.theta)
    k = rope(attn.k_proj(x).view(B, T, 2, -1).transpose(1, 2), pos, attn.theta)
    v = attn.v_proj(x).view(B, T, 2, -1).transpose(1, 2)
    o = masked_reference(q, k, v, pos, pos, 16)
    ref = attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy, = torch.autograd.grad(y.sum(), x)
    gr, = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(gy, gr, rtol=1e-10, atol=1e-12)
