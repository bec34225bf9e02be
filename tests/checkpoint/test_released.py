"""Released-checkpoint format: save_pretrained -> load_pretrained round trip and the bad-input errors."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from megasleep.checkpoint.errors import (
    MissingCheckpointFileError,
    PretrainedError,
    UnsafeCheckpointError,
    WeightsMismatchError,
)
from megasleep.checkpoint.load import load_pretrained
from megasleep.checkpoint.released import save_pretrained
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model


@pytest.mark.parametrize("pattern, kw", [("AGMA", {}), ("MAGMA", dict(n_prelude=1, n_coda=1, tie_embeddings=False))])
def test_round_trip_gives_identical_logits(tmp_path, pattern, kw):
    model = tiny_model(pattern, dtype=torch.float32, **kw).eval()
    out = save_pretrained(model, tmp_path / "export", sleep=SleepConfig(window=8, passes=2))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_pretrained(out)
    assert loaded.config == model.config
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    for cfg in (SleepConfig(window=30), SleepConfig(window=8, passes=3), SleepConfig(window=8, passes=2,
                                                                                      eviction="sliding")):
        with torch.no_grad():
            a = sleep_forward(model, ids, cfg, return_logits=True).logits
            b = sleep_forward(loaded, ids, cfg, return_logits=True).logits
        assert torch.equal(a, b)
    # tied head stays tied (stored once), flags on the SSM parameters survive
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
        meta = json.loads((out / "config.json").read_text())
        assert meta["tied_weights"] == {"lm_head.weight": "embed_tokens.weight"}
    ssm = [p for n, p in loaded.named_parameters() if n.endswith("A_log")]
    assert ssm and all(getattr(p, "_keep_fp32", False) for p in ssm)
    assert loaded.pretrained_meta["sleep"]["passes"] == 2


def test_dtype_options_and_overwrite(tmp_path):
    model = tiny_model("AGMA", dtype=torch.float32)
    save_pretrained(model, tmp_path / "m", dtype="bfloat16")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_pretrained(tmp_path / "m").embed_tokens.weight.dtype == torch.float32
    assert load_pretrained(tmp_path / "m", dtype="auto").embed_tokens.weight.dtype == torch.bfloat16
    # re-export over an existing directory: replaced whole, no temporary directories left behind
    (tmp_path / "m" / "stale.txt").write_text("x")
    save_pretrained(model, tmp_path / "m")
    assert not (tmp_path / "m" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # config overrides that keep every tensor shape (loop only the middle blocks)
    looped = load_pretrained(tmp_path / "m", n_prelude=1, n_coda=1)
    assert looped.core_idx == [1, 2]


def test_tokenizer_is_shipped(tmp_path):
    from megasleep.data.tokenizer import train_symbol_tokenizer

    tok = train_symbol_tokenizer(["0", "1", "<q>"], tmp_path / "tok")
    model = tiny_model("AGMA", vocab=tok.vocab_size, dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "m", tokenizer_path=tok.path)
    meta = json.loads((out / "config.json").read_text())
    assert meta["tokenizer"]["hash"] == tok.hash and (out / "tokenizer.model").read_bytes() == tok._bytes
    (out / "tokenizer.model").unlink()
    with pytest.raises(MissingCheckpointFileError, match="tokenizer"):
        load_pretrained(out)


def test_missing_files(tmp_path):
    model = tiny_model("AGMA", dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "m")
    with pytest.raises(MissingCheckpointFileError, match="not found"):
        load_pretrained(tmp_path / "nope")
    (out / "model.safetensors").unlink()
    with pytest.raises(MissingCheckpointFileError, match=r"no weights found .*model\.safetensors"):
        load_pretrained(out)
    (out / "config.json").unlink()
    with pytest.raises(MissingCheckpointFileError, match=r"missing config\.json"):
        load_pretrained(out)
    # through the CLI: one clear line, exit code 2
    from megasleep.cli import main

    assert main(["eval", "--checkpoint", str(out), "--task", "rule110"]) == 2


def test_config_weights_mismatch_names_tensors(tmp_path):
    model = tiny_model("AGMA", dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "m")
    meta = json.loads((out / "config.json").read_text())
    meta["d_model"] = 48          # every shape changes
    meta["pattern"] = "AGMAG"     # one block more
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsMismatchError) as e:
        load_pretrained(out)
    msg = str(e.value)
    assert "layers.4.norm.weight" in msg and "missing" in msg
    assert "embed_tokens.weight: (61, 32) vs (61, 48)" in msg
    assert any(n.startswith("layers.4.mixer.") for n in e.value.missing)

    # a state dict whose "tied" head differs from the embedding is not written
    from megasleep.checkpoint.released import save_state_dict_pretrained

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["lm_head.weight"] += 1
    with pytest.raises(WeightsMismatchError, match="ties lm_head.weight"):
        save_state_dict_pretrained(sd, model.config, tmp_path / "tied")
    assert not (tmp_path / "tied").exists()

    # an extra tensor in the file
    from safetensors.torch import load_file, save_file

    shutil.rmtree(out)
    out = save_pretrained(model, tmp_path / "m")
    sd = load_file(str(out / "model.safetensors"))
    sd["layers.0.mixer.surprise"] = torch.zeros(3)
    del sd["norm_f.weight"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"layers\.0\.mixer\.surprise") as e:
        load_pretrained(out)
    assert e.value.missing == ["norm_f.weight"] and e.value.unexpected == ["layers.0.mixer.surprise"]


class _Payload:
    """Unpickling this would create a marker file (stands for arbitrary code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickles_are_loaded_weights_only(tmp_path):
    model = tiny_model("AGMA", dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "m")
    (out / "model.safetensors").unlink()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(sd, out / "pytorch_model.bin")  # a plain state dict is fine through weights_only=True
    ids = torch.randint(0, 61, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_pretrained(out)(ids), model(ids))
    marker = tmp_path / "pwned"
    with open(out / "pytorch_model.bin", "wb") as f:
        pickle.dump({**sd, "evil": _Payload(marker)}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError, match="not weights-only"):
        load_pretrained(out)
    assert not marker.exists()
    torch.save({"weights": sd, "args": _Payload(marker)}, out / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(out)
    assert not marker.exists()
    (out / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(PretrainedError):
        load_pretrained(out)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(PretrainedError, match="no model_type and not a megasleep or mamba_ssm config"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        load_pretrained(tmp_path)


def test_deepspeed_model_states_are_read_weights_only(tmp_path):
    """A stage-0 DeepSpeed checkpoint is verified weights-only before it is read: a planted object in
    mp_rank_00_model_states.pt is refused (naming the file) and never runs; plain containers + tensors load."""
    from megasleep.checkpoint.deepspeed import read_training_checkpoint

    model = tiny_model("AG", dtype=torch.float32)
    tag = tmp_path / "ck" / "global_step1"
    tag.mkdir(parents=True)
    (tag / "megasleep.json").write_text(json.dumps({"config": {"model": model.config.model_dump(mode="json")}}))
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"module": sd, "ds_version": "0.19.8", "ds_config": {"zero_optimization": {"stage": 0}}},
               tag / "mp_rank_00_model_states.pt")
    state, cfg, *_ = read_training_checkpoint(tmp_path / "ck", "global_step1")
    assert set(state) == set(model.state_dict()) and cfg == model.config
    marker = tmp_path / "ran"
    torch.save({"module": sd, "evil": _Payload(marker)}, tag / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt"):
        read_training_checkpoint(tmp_path / "ck", "global_step1")
    assert not marker.exists()
