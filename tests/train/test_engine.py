"""build_ds_config (pure: no process group) and the preflight that `megasleep train --check-only`
runs before any rank starts: impossible settings are one line naming the file, the key(s) and the
world size."""

from __future__ import annotations

import json

import pytest

from megasleep.config import ConfigError
from megasleep.train.config import load_experiment
from megasleep.train.engine import build_ds_config, check_batch, zero_stage


def exp(tmp_path=None, ds: dict | None = None, *overrides: str):
    extra = list(overrides)
    if ds is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(ds))
        extra.append(f"deepspeed.config={path}")
    return load_experiment(None, ["train.global_batch_size=8", "train.micro_batch_size=2", *extra])


def test_batch_keys_filled_from_the_experiment():
    cfg = exp()
    for world, accum in ((1, 4), (2, 2), (4, 1)):
        conf = build_ds_config(cfg, world)
        assert conf["train_batch_size"] == 8 and conf["train_micro_batch_size_per_gpu"] == 2
        assert conf["gradient_accumulation_steps"] == accum == check_batch(cfg, world)
        assert conf["gradient_clipping"] == cfg.optim.grad_clip and "bf16" not in conf
    assert zero_stage(conf) == 1  # tiny-demo: zero1.json
    assert zero_stage(build_ds_config(exp(None, None, "deepspeed.zero_stage=3"), 1)) == 3


@pytest.mark.parametrize("world", [3, 8])
def test_impossible_batch_world_split_names_config_keys_and_world(world):
    cfg = exp()
    with pytest.raises(ConfigError) as exc:
        build_ds_config(cfg, world)
    msg = str(exc.value)
    assert "\n" not in msg and "tiny-demo.yaml" in msg and f"world size {world}" in msg, msg
    assert "train.global_batch_size=8" in msg and "train.micro_batch_size=2" in msg, msg


@pytest.mark.parametrize("ds, words", [
    ({"zero_optimization": {"stage": "one"}}, ["zero_optimization.stage", "'one'"]),
    ({"zero_optimisation": {"stage": 1}}, ["zero_optimisation", "unknown DeepSpeed key", "'zero_optimization'"]),
    ({"train_batch_szie": 8}, ["train_batch_szie", "unknown DeepSpeed key"]),
    ({"train_batch_size": 16}, ["train_batch_size=16", "conflicts", "8"]),
    ({"optimizer": {"type": "Adam"}}, ["'optimizer' is set by the experiment"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled"]),
    ([1, 2], ["top level must be an object"]),
])
def test_bad_deepspeed_json_names_the_key(tmp_path, ds, words):
    cfg = exp(tmp_path, ds)
    with pytest.raises(ConfigError) as exc:
        build_ds_config(cfg, 1)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "ds.json") in msg and all(w in msg for w in words), msg


def test_every_shipped_deepspeed_json_passes(tmp_path):
    from megasleep.train.config import REPO_ROOT

    for path in sorted((REPO_ROOT / "configs" / "deepspeed").glob("*.json")):
        conf = build_ds_config(exp(None, None, f"deepspeed.config={path}"), 2)
        assert conf["gradient_accumulation_steps"] == 2, path


def _check_only(capsys, *args: str) -> tuple[int, list[str]]:
    import sys

    from megasleep.cli import main

    argv = sys.argv
    try:
        rc = main(["train", *args, "--check-only"])
    finally:
        sys.argv = argv
    return rc, capsys.readouterr().err.strip().splitlines()


def test_check_only_interface(capsys, tmp_path):
    """The interface the SLURM script calls before starting ranks: exit 0, or 2 + one line."""
    common = ["train.global_batch_size=8", "train.micro_batch_size=2", f"run_dir={tmp_path}/run"]
    rc, err = _check_only(capsys, "configs/experiments/tiny-demo.yaml", *common, "--world-size", "4")
    assert rc == 0 and "ok for world size 4" in err[-1], err
    rc, err = _check_only(capsys, "configs/experiments/tiny-demo.yaml", *common, "--world-size", "3")
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("megasleep train: error:") and "tiny-demo.yaml" in err[0] and "world size 3" in err[0]
    assert "train.global_batch_size=8" in err[0] and "train.micro_batch_size=2" in err[0]
    rc, err = _check_only(capsys, *common, "data.tokenizer=/nonexistent/tok.model", "--world-size", "2")
    assert rc == 2 and len(err) == 1 and "data.tokenizer" in err[0] and "world size 2" in err[0], err
    assert not (tmp_path / "run").exists()  # a check writes nothing


def test_local_rank_argument_is_accepted(capsys, monkeypatch):
    """`deepspeed --module megasleep.train.cli ...` appends --local_rank=N."""
    monkeypatch.setenv("LOCAL_RANK", "7")
    monkeypatch.delenv("LOCAL_RANK")  # (restored to absent after the test)
    rc, err = _check_only(capsys, "train.global_batch_size=8", "train.micro_batch_size=2", "--local_rank=0",
                          "--world-size", "1")
    assert rc == 0, err
    import os

    assert os.environ["LOCAL_RANK"] == "0"
