"""bamba and granitemoehybrid (dense) adapters: logits equal transformers' own implementation (its
pure-torch Mamba-2 path on CPU) in fp32 at window >= T, N = 1, every stored tensor mapped; the
mixture-of-experts form and non-identity multipliers are refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megasleep.checkpoint.errors import UnsupportedModelError
from megasleep.checkpoint.load import load_pretrained, read_checkpoint
from tests.checkpoint.hf_models import assert_logits_close, build_hf, grouped_norm_or_skip

MAMBA = dict(mamba_n_heads=8, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=2, mamba_chunk_size=8)
COMMON = dict(hidden_size=32, num_hidden_layers=3, vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
              **MAMBA)
CASES = {
    # partial rotary (half the head), attention in the middle
    "bamba": dict(intermediate_size=48, attn_layer_indices=[1], **COMMON),
    # dense form, no positions (NoPE), attention_multiplier as the softmax scale, tied head
    "granitemoehybrid": dict(intermediate_size=48, shared_intermediate_size=40, num_local_experts=0,
                             layer_types=["mamba", "attention", "mamba"], attention_multiplier=0.3,
                             tie_word_embeddings=True, **COMMON),
    "granitemoehybrid-rope": dict(intermediate_size=48, shared_intermediate_size=40, num_local_experts=0,
                                  layer_types=["attention", "mamba", "mamba"], position_embedding_type="rope",
                                  **COMMON),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    src = build_hf(case.split("-")[0], tmp_path / "hf", **CASES[case])
    model = load_pretrained(tmp_path / "hf")
    assert set(model.pretrained_meta["import"]["mapped"]) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    grouped_norm_or_skip(src, MAMBA["mamba_n_groups"])
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_close(model(ids), src(ids).logits)


def test_moe_and_multipliers_are_refused(tmp_path):
    build_hf("granitemoehybrid", tmp_path / "moe", intermediate_size=48, shared_intermediate_size=40,
             num_local_experts=4, layer_types=["mamba", "attention", "mamba"], **COMMON)
    with pytest.raises(UnsupportedModelError, match="num_local_experts=4"):
        read_checkpoint(tmp_path / "moe")
    build_hf("granitemoehybrid", tmp_path / "mul", intermediate_size=48, shared_intermediate_size=40,
             num_local_experts=0, layer_types=["mamba", "attention", "mamba"], embedding_multiplier=12.0, **COMMON)
    with pytest.raises(UnsupportedModelError, match="embedding_multiplier=12.0"):
        read_checkpoint(tmp_path / "mul")
