"""llama / qwen2 adapter: a tiny random transformers model saved by save_pretrained loads into HybridLM
with every tensor mapped, gives transformers' own logits (fp32, window >= T, N = 1, <= 1e-4 relative),
and exports back to a directory transformers loads with the same logits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megasleep.checkpoint.errors import UnsupportedModelError
from megasleep.checkpoint.load import load_pretrained, read_checkpoint
from tests.checkpoint.hf_models import assert_logits_close, build_hf

SMALL = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)


@pytest.mark.parametrize("model_type, extra", [("llama", {}), ("llama", {"attention_bias": True,
                                                                            "tie_word_embeddings": True}),
                                                ("qwen2", {})])
def test_logits_match_transformers(tmp_path, model_type, extra):
    src = build_hf(model_type, tmp_path / "hf", **SMALL, **extra)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    model = load_pretrained(tmp_path / "hf")
    assert model.pretrained_meta["format"] == "transformers-llama"
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(model.pretrained_meta["import"]["mapped"]) == set(saved)  # every stored tensor, none left over
    with torch.no_grad():
        assert_logits_close(model(ids), src(ids).logits)


def test_export_round_trip_loads_in_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from megasleep.checkpoint.export import export_foreign

    build_hf("qwen2", tmp_path / "hf", **SMALL)
    model = load_pretrained(tmp_path / "hf")
    export_foreign(model, tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    ids = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        assert_logits_close(back(ids).logits, model(ids))


def test_unfaithful_settings_are_refused(tmp_path):
    build_hf("llama", tmp_path / "hf", **SMALL, mlp_bias=True)
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        read_checkpoint(tmp_path / "hf")
