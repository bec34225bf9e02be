"""Retrofit: SSM blocks inserted with a zero output projection leave the function unchanged (logits equal
the source model's, also with sleep passes), only the chosen core loops, the export records the sleep
settings; and a sleep fine-tuning run starts from it through the trainer (slow)."""

from __future__ import annotations

import pytest
import torch

from megasleep.checkpoint.load import load_pretrained
from megasleep.checkpoint.retrofit import parse_insert, retrofit
from megasleep.cli import main
from megasleep.config import ConfigError
from megasleep.sleep import SleepConfig, sleep_forward
from tests.checkpoint.hf_models import assert_logits_close, build_hf
from tests.conftest import ROOT

LLAMA = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)


@pytest.fixture
def llama(tmp_path):
    src = build_hf("llama", tmp_path / "llama", **LLAMA)
    return src, tmp_path / "llama"


def test_retrofit_is_the_identity_before_training(tmp_path, llama):
    src, path = llama
    assert main(["retrofit", "--from", str(path), "--insert", "gdn:after=0,2", "--loop", "1:5", "--out",
                 str(tmp_path / "r"), "--window", "8", "--passes", "2"]) == 0
    model = load_pretrained(tmp_path / "r")
    cfg = model.config
    assert cfg.pattern == "AGAAGA" and (cfg.n_prelude, cfg.n_coda) == (1, 1) and cfg.mlp.G == 0
    assert model.pretrained_meta["sleep"] == {"window": 8, "passes": 2}
    assert (tmp_path / "r" / "model.yaml").is_file()
    assert float(model.layers[1].mixer.o_proj.weight.detach().abs().max()) == 0.0
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    base = load_pretrained(path)
    with torch.no_grad():
        assert_logits_close(model(ids), src(ids).logits)       # vs transformers' Llama
        assert torch.equal(model(ids), base(ids))              # zero output projection: exactly the source
        # with windows and sleep passes the new blocks still add nothing: N=2 equals N=1
        n1 = sleep_forward(model, ids, SleepConfig(window=8, passes=1), return_logits=True).logits
        n2 = sleep_forward(model, ids, SleepConfig(window=8, passes=2), return_logits=True).logits
    assert torch.equal(n1, n2)


def test_bad_specs_are_named(tmp_path, llama):
    _, path = llama
    with pytest.raises(ConfigError, match="KIND:after"):
        parse_insert("gdn:3,4")
    with pytest.raises(ConfigError, match="blocks 0..3"):
        retrofit(path, tmp_path / "x", insert="gdn:after=9")
    with pytest.raises(ConfigError, match="START < END"):
        retrofit(path, tmp_path / "x", insert="gdn:after=1", loop="4:2")


@pytest.mark.slow
def test_sleep_finetuning_starts_from_a_retrofit(tmp_path, llama):
    """CPU smoke run: tiny random Llama -> retrofit -> `megasleep train` with checkpoint.init_from through
    DeepSpeed (N=2, hard eviction), loss finite, export written."""
    import json

    from tests.train.helpers import FAST, run_train

    _, path = llama
    out = retrofit(path, tmp_path / "r", insert="gdn:after=1", loop="1:4", sleep={"window": 24, "passes": 2})
    run = tmp_path / "run"
    run_train(*FAST, f"run_dir={run}", f"model={out / 'model.yaml'}", f"checkpoint.init_from={out}",
              "sleep.passes=2", "optim.name=muon", "optim.muon_lr=1e-3", "train.steps=3", "checkpoint.export=true",
              "data.task.params={n_strings: 1, width: 24}", timeout=600)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 3 and all(r["passes"] == 2 and r["loss"] == r["loss"] for r in train)
    assert load_pretrained(run / "export").config.pattern == "AAGAA"


def test_shipped_retrofit_model_yaml_is_what_the_command_writes():
    """configs/retrofit/tinyllama-1.1b-gdn6.yaml (used by the retrofit recipes) equals the config
    `megasleep retrofit --insert gdn:after=2,5,9,12,15,19 --loop 7:21` derives from TinyLlama-1.1B's
    config.json (its published values: llama, d=2048, 22 layers, 32/4 heads, SwiGLU 5632, vocab 32000)."""
    from megasleep.checkpoint.adapters.hf_attention import HFAttentionAdapter
    from megasleep.checkpoint.retrofit import retrofit_config
    from megasleep.models.config import load_model_config
    from megasleep.train.config import load_experiment

    tinyllama = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "vocab_size": 32000, "tie_word_embeddings": False, "hidden_act": "silu"}
    cfg, _ = retrofit_config(HFAttentionAdapter().model_config(tinyllama, "tinyllama"), "G",
                             [2, 5, 9, 12, 15, 19], "7:21")
    shipped = load_model_config(ROOT / "configs/retrofit/tinyllama-1.1b-gdn6.yaml")
    assert shipped.model_copy(update={"name": cfg.name}) == cfg
    for recipe in ("hard", "sliding"):
        exp = load_experiment(ROOT / f"configs/experiments/retrofit-gsm-inf-{recipe}.yaml")
        assert exp.model_cfg == shipped and exp.optim.name == "muon" and exp.optim.muon_lr == 1e-3
        assert (exp.sleep.window, exp.sleep.eviction) == ((2000, "hard") if recipe == "hard" else (512, "sliding"))
