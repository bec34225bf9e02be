"""transformers ``mamba2`` adapter: logits equal transformers' own Mamba2ForCausalLM (its pure-torch path on
CPU) in fp32 at window >= T, N = 1, with every stored tensor mapped."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from megasleep.checkpoint.load import load_pretrained
from tests.checkpoint.hf_models import assert_logits_close, build_hf, grouped_norm_or_skip


def test_mamba2_logits_match_transformers(tmp_path):
    src = build_hf("mamba2", tmp_path / "hf", hidden_size=32, num_hidden_layers=2, vocab_size=64, num_heads=8,
                   head_dim=8, state_size=8, n_groups=2, expand=2, chunk_size=8, layer_norm_epsilon=1e-6)
    model = load_pretrained(tmp_path / "hf")
    assert model.pretrained_meta["format"] == "transformers-mamba2"
    assert set(model.pretrained_meta["import"]["mapped"]) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    grouped_norm_or_skip(src, 2)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_logits_close(model(ids), src(ids).logits)
