"""Run lifecycle: status.json says `failed` on every crash path; a diverged run stops as failed and
never leaves the diverged weights as the last good checkpoint; train.steps changed on resume is
refused (or re-planned when asked); the stop policy's flags."""

from __future__ import annotations

import json
import os
import time

import pytest

from megasleep.train.lifecycle import RunStatus, StopPolicy
from tests.train.faults import fault_env
from tests.train.helpers import FAST, run_train, status


def test_run_status_fail_only_after_the_run_started(tmp_path):
    st = RunStatus(tmp_path / "run", rank=0, steps=10, world=1)
    st.fail(RuntimeError("before start"))
    assert not (tmp_path / "run").exists()  # a config error writes nothing
    st.write("running")
    st.step = 3
    st.fail(ValueError("boom"))
    rec = json.loads((tmp_path / "run" / "status.json").read_text())
    assert rec["state"] == "failed" and rec["step"] == 3 and rec["reason"] == "ValueError: boom"
    other = RunStatus(tmp_path / "other", rank=1, steps=10, world=2)
    other.write("running")
    assert not (tmp_path / "other").exists()  # only rank 0 writes


def test_stop_policy(tmp_path):
    old = time.time() - 3600
    pol = StopPolicy(tmp_path, rank=0, t_start=old, time_limit_minutes=None, time_budget_minutes=30)
    assert not pol.wants_stop() and pol.budget_spent()
    (tmp_path / "STOP").write_text("")
    os.utime(tmp_path / "STOP", (old - 10, old - 10))
    pol.clear_stale_stop_file()  # written before this launch: stale
    assert not (tmp_path / "STOP").exists() and not pol.wants_stop()
    (tmp_path / "STOP").write_text("")
    assert pol.wants_stop() and pol.reason == "STOP file"
    limit = StopPolicy(tmp_path / "x", rank=1, t_start=old, time_limit_minutes=1, time_budget_minutes=30)
    assert limit.wants_stop() and limit.reason == "time_limit" and not limit.budget_spent()  # budget: rank 0


FAIL_FAST = [*FAST, "train.steps=6", "checkpoint.every=1"]


@pytest.mark.slow
def test_exception_in_a_step_writes_failed(tmp_path):
    run = tmp_path / "run"
    p = run_train(*FAIL_FAST, f"run_dir={run}", check=False, extra_env=fault_env(raise_at_step=3))
    assert p.returncode != 0 and "injected fault at step 3" in p.stderr, p.stderr[-3000:]
    st = status(run)
    assert st["state"] == "failed" and st["step"] == 2 and "injected fault at step 3" in st["reason"], st


@pytest.mark.slow
def test_exception_while_building_writes_failed(tmp_path):
    """The run directory exists and says `running` before the model is built: a failure there too
    must end as `failed` (here the model's vocabulary is smaller than the task tokenizer's)."""
    run = tmp_path / "run"
    p = run_train(*FAIL_FAST, f"run_dir={run}", "model.vocab_size=3", check=False)
    assert p.returncode == 2 and "model.vocab_size=3" in p.stderr.strip().splitlines()[-1], p.stderr[-3000:]
    st = status(run)
    assert st["state"] == "failed" and "model.vocab_size=3" in st["reason"], st


@pytest.mark.slow
def test_divergence_stops_failed_and_keeps_no_diverged_checkpoint(tmp_path):
    """lr = 1e6: the first update explodes the weights, every later loss is NaN. The run stops with
    status failed and the checkpoint saved from those weights is not left as the last good one."""
    run = tmp_path / "run"
    p = run_train(*FAIL_FAST, f"run_dir={run}", "optim.lr=1e6", "optim.warmup_steps=0", "train.max_bad_steps=3",
                  check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    assert "the weights diverged" in p.stderr and "no good checkpoint yet" in p.stderr, p.stderr[-3000:]
    assert status(run)["state"] == "failed"
    from megasleep.train.checkpoint import find_latest

    assert find_latest(run / "checkpoints") is None  # step 1 (the exploded weights) is not resumable
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_steps_changed_on_resume_is_refused_unless_asked(tmp_path):
    run = tmp_path / "run"
    run_train(*FAST, f"run_dir={run}", "train.steps=4")
    p = run_train(*FAST, f"run_dir={run}", "train.steps=6", check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "train.steps=6" in last and "train.steps=4" in last, p.stderr[-3000:]
    assert "allow_steps_change" in last
    p = run_train(*FAST, f"run_dir={run}", "train.steps=6", "checkpoint.allow_steps_change=true")
    assert "lr schedule is re-planned" in p.stderr and status(run)["step"] == 6
