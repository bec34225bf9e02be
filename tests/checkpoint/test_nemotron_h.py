"""nemotron_h adapter: Mamba-2 / attention layers merged with the ReLU² MLP layer after them into megasleep
blocks; logits equal transformers' NemotronHForCausalLM (pure-torch path on CPU) in fp32 at window >= T,
N = 1, every stored tensor mapped; an MLP layer that follows no mixer is refused by layer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megasleep.checkpoint.adapters.nemotron_h import group_layers
from megasleep.checkpoint.errors import UnsupportedModelError
from megasleep.checkpoint.load import load_pretrained
from tests.checkpoint.hf_models import assert_logits_close, build_hf

SMALL = dict(hidden_size=32, intermediate_size=48, vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, mamba_num_heads=8, mamba_head_dim=8, ssm_state_size=8, n_groups=2, chunk_size=8)


def test_logits_match_transformers(tmp_path):
    # Mamba+MLP, attention+MLP, Mamba without MLP, attention without MLP
    src = build_hf("nemotron_h", tmp_path / "hf", num_hidden_layers=6, hybrid_override_pattern="M-*-M*", **SMALL)
    model = load_pretrained(tmp_path / "hf")
    assert model.config.pattern == "MAMA" and model.config.mlp.blocks == "1100"
    assert set(model.pretrained_meta["import"]["mapped"]) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_close(model(ids), src(ids).logits)


def test_orphan_mlp_layer_is_refused():
    with pytest.raises(UnsupportedModelError, match="layer 2 is an MLP layer"):
        group_layers(["mamba", "mlp", "mlp"], "cfg")
