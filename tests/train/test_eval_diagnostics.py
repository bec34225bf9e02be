"""Wiring of the collapse diagnostics and of the recorded task into evaluation: a tiny training run's
eval.json and metrics carry the diagnostics of every N, its export records the task it was trained on,
and `megasleep eval --task` on that export defaults to the recorded (non-default) task parameters and
prints the diagnostics table."""

from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

from megasleep.train.metrics import _flatten
from tests.train.helpers import PY, ROOT, env, run_train

# tiny-demo trains Rule 110 with n_strings=1, width=24, difficulty 0-3 (the generator's defaults are
# 4 strings and t=32): an evaluation with the defaults would measure another task
RECORDED = {"n_strings": 1, "width": 24}


def test_training_eval_carries_diagnostics_and_eval_defaults_to_the_recorded_task(tmp_path):
    run = tmp_path / "run"
    run_train(f"run_dir={run}", "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4",
              "optim.warmup_steps=1", "checkpoint.every=0", "checkpoint.resume=never", "eval.eval_passes=[1,2]",
              "eval.samples=8", "eval.batch_size=4", "logging.tensorboard=false", "logging.progress=false")
    results = {r["passes"]: r for r in json.loads((run / "eval.json").read_text())["results"]}
    assert set(results) == {1, 2}
    assert results[1]["collapse_status"] == "awake"
    assert results[2]["collapse_status"] in ("ok", "collapsed", "shared keys")
    d2 = results[2]["diagnostics"]
    assert d2["diag/passes"] == 2.0 and math.isfinite(d2["diag/memory_worth"])
    assert {"diag/pass2/G1/key_share", "diag/pass2/G3/key_share", "diag/pass2/rms"} <= set(d2)
    assert "diag/pass2/rms" not in results[1]["diagnostics"]
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line).get("kind") == "eval"]
    assert evals and evals[-1]["N=2"]["diag"]["memory_worth"] == d2["diag/memory_worth"]
    flat = _flatten(evals[-1], "eval/")  # the names TensorBoard / W&B get
    assert flat["eval/N=2/diag/pass2/G1/key_share"] == d2["diag/pass2/G1/key_share"]
    assert evals[-1]["N=2"]["collapse_status"] == results[2]["collapse_status"]
    source = json.loads((run / "export" / "config.json").read_text())["source"]
    assert source["data"]["task"]["name"] == "rule110" and source["data"]["task"]["params"] == RECORDED
    # `megasleep export` of the run's DeepSpeed checkpoint records the same task
    exp = tmp_path / "exported"
    p = subprocess.run([PY, "-m", "megasleep.cli", "export", str(run / "checkpoints"), "--out", str(exp)], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert json.loads((exp / "config.json").read_text())["source"]["data"]["task"] == source["data"]["task"]

    out = tmp_path / "eval"
    cmd = [PY, "-m", "megasleep.cli", "eval", "--checkpoint", str(run / "export"), "--task", "rule110",
           "--n-examples", "2", "--eval-passes", "1,2", "--batch-size", "4", "--no-plots", "--no-progress",
           "--device", "cpu", "--out", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())["data"]
    assert {k: data["params"][k] for k in RECORDED} == RECORDED and data["difficulties"] == [0, 1, 2, 3]
    assert "using the task parameters recorded in" in p.stderr and "using the difficulty recorded" in p.stderr
    assert "collapse diagnostics" in p.stdout and "| N=2 | 2 |" in p.stdout and "| N=1 | 1 |" in p.stdout
    saved = {r["passes"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert saved[2]["collapse_status"] in ("ok", "collapsed", "shared keys") and saved[1]["collapse_status"] == "awake"


def _args(task="rule110", params=(), difficulty=None):
    return SimpleNamespace(task=task, task_param=list(params), difficulty=difficulty, checkpoint="ck")


def test_task_settings_warn_on_differing_parameters_and_other_tasks():
    from megasleep.eval.cli import task_settings

    info = {"source": {"data": {"source": "task", "task": {"name": "rule110", "params": RECORDED,
                                                          "difficulty": "0-3", "eval_difficulty": None}}}}
    params, diff, notes = task_settings(_args(), info)
    assert params == RECORDED and diff == "0-3" and len(notes) == 2
    params, diff, notes = task_settings(_args(params=["width=16"], difficulty="2"), info)
    assert params == {"width": 16} and diff == "2"
    assert notes == ["warning: task parameters differ from those ck (config.json source.data.task) was trained "
                     "with: n_strings=4 (trained 1), width=16 (trained 24)"]
    params, diff, notes = task_settings(_args(params=["n_strings=1", "width=24"]), info)
    assert params == RECORDED and notes == ["using the difficulty recorded in ck (config.json source.data.task): 0-3 "
                                            "(--difficulty overrides)"]
    params, diff, notes = task_settings(_args(task="depo"), info)
    assert params == {} and diff == "1,2,4,8,16" and "trained on task 'rule110', not 'depo'" in notes[0]
    assert task_settings(_args(), {"source": {"kind": "mamba_ssm"}}) == ({}, "32", [])
