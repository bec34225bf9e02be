"""olmo_hybrid adapter: logits equal transformers' OlmoHybridForCausalLM in fp32 at window >= T, N = 1, every
stored tensor mapped (RoPE and the released checkpoints' NoPE, beta in [0, 2] or [0, 1], attention biases);
a sleep run at N = 2 with a short window carries the GDN states; export is the inverse of import (round trip
through transformers); a mis-shaped tensor and an unsupported option are refused by name."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file

from megasleep.checkpoint.adapters.olmo_hybrid import OlmoHybridAdapter
from megasleep.checkpoint.adapters.registry import adapter_for
from megasleep.checkpoint.errors import UnsupportedModelError, WeightsMismatchError
from megasleep.checkpoint.export import export_foreign
from megasleep.checkpoint.load import load_pretrained, read_checkpoint
from tests.checkpoint.hf_models import assert_logits_close, build_hf

# GDN-key heads of 6 dims, value heads of 12 (transformers' defaults for this width), GQA attention
SMALL = dict(hidden_size=32, intermediate_size=48, vocab_size=64, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=4, pad_token_id=None, eos_token_id=None,
             layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
CASES = {
    "rope-negeig": dict(),
    "nope-biases-tied": dict(rope_parameters={"rope_type": "default", "rope_theta": None}, attention_bias=True,
                             linear_allow_neg_eigval=False, tie_word_embeddings=True),
}


@pytest.fixture(autouse=True)
def torch_reference(monkeypatch):
    """transformers binds FLA's Triton kernels (and causal_conv1d's) when those import, and FLA imports on
    this machine although it cannot run on the CPU: point the GDN layers at transformers' own torch
    functions, which the decorators keep as ``__wrapped__``."""
    mod = pytest.importorskip("transformers.models.olmo_hybrid.modeling_olmo_hybrid",
                              reason="transformers without olmo_hybrid")
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update"):
        monkeypatch.setattr(mod, name, inspect.unwrap(getattr(mod, name)))


def _ids(t: int = 20) -> torch.Tensor:
    return torch.randint(0, 64, (2, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    src = build_hf("olmo_hybrid", tmp_path / "hf", **{**SMALL, **CASES[case]})
    model = load_pretrained(tmp_path / "hf")
    c = model.config
    assert (c.pattern, c.post_norm, c.attn.qk_norm) == ("GAGA", "A", True)
    assert c.gdn.allow_neg_eigval == CASES[case].get("linear_allow_neg_eigval", True)
    assert c.attn.rotary_dim == (0 if "nope" in case else None)
    assert set(model.pretrained_meta["import"]["mapped"]) == set(load_file(tmp_path / "hf" / "model.safetensors"))
    with torch.no_grad():
        assert_logits_close(model(_ids()), src(_ids()).logits)


def test_reads_transformers_in_memory_names(tmp_path):
    """A file in transformers' in-memory names (input_layernorm, one fused conv1d) reads the same."""
    src = build_hf("olmo_hybrid", tmp_path / "hf", **SMALL)
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    assert "model.layers.0.linear_attn.conv1d.weight" in state and "model.layers.0.input_layernorm.weight" in state
    save_file(state, tmp_path / "mem" / "model.safetensors", metadata={"format": "pt"})
    model = load_pretrained(tmp_path / "mem")
    with torch.no_grad():
        assert_logits_close(model(_ids()), src(_ids()).logits)
    state["model.layers.0.linear_attn.conv1d.weight"] = torch.ones(50, 1, 4)
    save_file(state, tmp_path / "mem" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"model\.safetensors.*tensor model\.layers\.0\.linear_attn\.conv1d"
                                                    r"\.weight has shape \(50, 1, 4\)"):
        read_checkpoint(tmp_path / "mem")


def test_sleep_at_two_passes_carries_gdn_state(tmp_path):
    from megasleep.sleep.config import SleepConfig
    from megasleep.sleep.loop import sleep_forward

    build_hf("olmo_hybrid", tmp_path / "hf", **SMALL)
    model = load_pretrained(tmp_path / "hf")
    ids = _ids(24)

    def run(window, passes):
        cfg = SleepConfig(window=window, passes=passes, eviction="hard")
        return sleep_forward(model, ids, cfg, return_logits=True).logits

    with torch.no_grad():
        torch.testing.assert_close(run(24, 1), model(ids))  # one window, N = 1: the source function
        logits, once = run(8, 2), run(8, 1)
    assert logits.shape == (2, 24, 64) and torch.isfinite(logits).all()
    # the first window is the same at N = 1 and 2 (no sleep yet); later windows read the slept states
    torch.testing.assert_close(logits[:, :8], once[:, :8])
    assert not torch.allclose(logits[:, 8:], once[:, 8:])


def test_export_round_trip(tmp_path):
    import transformers

    build_hf("olmo_hybrid", tmp_path / "hf", **{**SMALL, **CASES["nope-biases-tied"]})
    model = load_pretrained(tmp_path / "hf")
    export_foreign(model, tmp_path / "back", family="olmo_hybrid")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    again = load_pretrained(tmp_path / "back")
    with torch.no_grad():
        assert_logits_close(back(_ids()).logits, model(_ids()))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_mis_shaped_tensor_names_file_and_tensor(tmp_path):
    build_hf("olmo_hybrid", tmp_path / "hf", **SMALL)
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.self_attn.q_norm.weight"] = torch.ones(31)
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError,
                       match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.q_norm\.weight has shape \(31,\)"):
        read_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("change,named", [
    ({"linear_num_value_heads": 8}, "linear_num_value_heads=8"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope_type='linear'"),
    ({"layer_types": ["linear_attention", "sliding_attention", "linear_attention", "full_attention"]},
     "sliding_attention"),
])
def test_unsupported_options_are_refused_by_name(tmp_path, change, named):
    raw = {"model_type": "olmo_hybrid", "linear_num_key_heads": 4, "linear_num_value_heads": 4,
           "linear_key_head_dim": 6, "linear_value_head_dim": 12, **SMALL, **change}
    with pytest.raises(UnsupportedModelError, match=f"cannot import faithfully: .*{named}"):
        OlmoHybridAdapter().model_config(raw, str(tmp_path))


def test_absent_gdn_keys_take_transformers_defaults_and_neighbours_are_named(tmp_path):
    raw = {"model_type": "olmo_hybrid", **SMALL}
    g = OlmoHybridAdapter().model_config(raw, str(tmp_path)).gdn
    assert (g.n_heads, g.head_dim, g.expand_v, g.allow_neg_eigval) == (4, 6, 2.0, True)  # as OlmoHybridConfig
    with pytest.raises(UnsupportedModelError, match="'olmo3_5_hybrid' is not supported .nearest supported: 'olmo_hybrid'"):
        adapter_for({"model_type": "olmo3_5_hybrid"}, "config.json")


def test_export_refuses_a_model_of_another_shape(tmp_path):
    from megasleep.models.config import ModelConfig
    from megasleep.models.hybrid import build_model

    model = build_model(ModelConfig(vocab_size=64, d_model=32, pattern="GA"))
    with pytest.raises(UnsupportedModelError, match="post_norm=''.*attn.qk_norm=false"):
        export_foreign(model, tmp_path / "out", family="olmo_hybrid")
    assert not (tmp_path / "out").exists()
