"""Malformed configs fail with one clear message naming the key and the file."""

from __future__ import annotations

import textwrap

import pytest

from megasleep.config import ConfigError, load_config
from megasleep.models import load_model_config
from megasleep.sleep import SleepConfig

GOOD = """
name: t
vocab_size: 100
d_model: 64
pattern: AGAG
attn: {n_heads: 4}
"""


def write(tmp_path, text, name="m.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_good_config_and_overrides(tmp_path):
    cfg = load_model_config(write(tmp_path, GOOD), ["d_model=128", "model.attn.n_heads=8"])
    assert cfg.d_model == 128 and cfg.attn.n_heads == 8 and cfg.mixers == ["attn", "gdn", "attn", "gdn"]


@pytest.mark.parametrize("extra, key, words", [
    ("d_modle: 3", "d_modle", "unknown key"),
    ("attn: {n_heads: 4, rope: 1}", "attn.rope", "unknown key"),
    ("vocab_size: lots", "vocab_size", "integer"),
    ("pattern: AGXG", "pattern", "unknown block letter"),
    ("attn: {n_heads: 5}", "n_heads=5", "does not divide d_model=64"),
    ("n_prelude: 2\nn_coda: 2", "n_prelude=2", "no core blocks"),
])
def test_model_config_errors(tmp_path, extra, key, words):
    path = write(tmp_path, GOOD + extra + "\n")
    with pytest.raises(ConfigError) as exc:
        load_model_config(path)
    msg = str(exc.value)
    assert str(path) in msg and key in msg and words in msg, msg
    assert "\n" not in msg.strip() or msg.count(str(path)) >= 1


@pytest.mark.parametrize("text, key, words", [
    ("window: 0", "window", "greater than or equal to 1"),
    ("window: 8\npasses: 0", "passes", "greater than or equal to 1"),
    ("window: 8\neviction: soft", "eviction", "'hard' or 'sliding'"),
    ("window: 8\nrandom_passes: [3, 1]", "random_passes", "lo <= hi"),
    ("window: 8\nsleep_passes: 2", "sleep_passes", "unknown key"),
])
def test_sleep_config_errors(tmp_path, text, key, words):
    path = write(tmp_path, text + "\n", "s.yaml")
    with pytest.raises(ConfigError) as exc:
        load_config(SleepConfig, path)
    msg = str(exc.value)
    assert str(path) in msg and key in msg and words in msg, msg


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_model_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_model_config(write(tmp_path, GOOD), ["d_model"])


def test_one_model_loader_for_every_file_that_holds_a_model(tmp_path):
    """Model YAML, experiment YAML (model as a path or as base + changes) and an exported config.json
    all go through load_model_config and give the same ModelConfig."""
    import json

    model = write(tmp_path, GOOD)
    ref = load_model_config(model)
    exp_path = write(tmp_path, f"model: {model}\nsleep: {{window: 8}}\n", "exp.yaml")
    exp_base = write(tmp_path, f"model: {{base: {model}, d_model: 128}}\n", "exp2.yaml")
    exported = tmp_path / "config.json"
    exported.write_text(json.dumps({**ref.model_dump(mode="json"), "sleep": {"window": 8}, "format": "megasleep"}))
    assert load_model_config(exp_path) == ref == load_model_config(exported)
    from megasleep.config import read_config_file

    assert read_config_file(exported)["norm_eps"] == 1e-05  # JSON floats stay floats (YAML 1.1: a string)
    assert load_model_config(exp_base) == ref.model_copy(update={"d_model": 128})
    with pytest.raises(ConfigError, match="model.base: model config file not found"):
        load_model_config(write(tmp_path, "model: {base: nope.yaml}\n", "exp3.yaml"))
