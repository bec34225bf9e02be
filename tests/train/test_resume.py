"""Exact resume and crash safety of checkpoints (one process, ZeRO-1, CPU).

* golden losses of the tiny config (tests/assets/losses/tiny-demo.txt);
* SIGTERM at step k -> checkpoint of step k -> the same command resumes -> every step's loss is
  identical (==) to an uninterrupted run;
* SIGKILL while a checkpoint is being saved -> `latest` still names the previous checkpoint, which
  loads (DeepSpeed's zero_to_fp32 too), and resuming from it reproduces the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.train.faults import fault_env
from tests.train.golden import compare, read_golden
from tests.train.helpers import FAST, ROOT, env, losses, run_train, status, train_cmd, wait_for


def test_golden_losses(reference_run):
    _, got = reference_run
    problems = compare(got, read_golden())
    assert not problems, "loss trajectory moved away from tests/assets/losses/tiny-demo.txt:\n" + "\n".join(
        problems) + "\n(if intended: python tests/train/golden.py --update)"


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_sigterm_then_resume_is_exact(reference_run, tmp_path):
    _, ref = reference_run
    run_dir = tmp_path / "run"
    args = [*FAST, f"run_dir={run_dir}"]
    p = subprocess.Popen(train_cmd(*args), cwd=ROOT, env=env(**fault_env(step_sleep=0.3)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(losses(run_dir)) >= 4, 180, "step 4", proc=p)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-4000:]
    st = status(run_dir)
    k = st["step"]
    assert st["state"] == "preempted" and st["reason"] == "SIGTERM" and 4 <= k < 10, st
    tag = f"step_{k:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag
    assert (run_dir / "checkpoints" / tag / "megasleep.json").is_file()
    assert sorted(losses(run_dir)) == list(range(1, k + 1))

    p2 = run_train(*args)
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {k}" in p2.stderr
    assert status(run_dir)["state"] == "done"
    got = losses(run_dir)
    assert got == ref, {s: (got.get(s), ref[s]) for s in ref if got.get(s) != ref[s]}


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_sigkill_during_save_keeps_previous_checkpoint(reference_run, tmp_path):
    _, ref = reference_run
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    args = [*FAST, f"run_dir={run_dir}", "checkpoint.every=3", "checkpoint.keep_last=2"]
    p = subprocess.Popen(train_cmd(*args), cwd=ROOT,
                         env=env(**fault_env(pause_in_save_steps=[6], pause_in_save_seconds=120)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        wait_for(lambda: (ckpt / ".saving").is_file() and (ckpt / ".saving").read_text() == "step_00000006", 180,
                 "the save of step 6", proc=p)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    # the interrupted save: files written, never marked complete; `latest` was not switched
    assert (ckpt / "step_00000006").is_dir() and not (ckpt / "step_00000006" / "megasleep.json").exists()
    assert (ckpt / "latest").read_text().strip() == "step_00000003"
    assert (ckpt / "step_00000003" / "megasleep.json").is_file()
    assert status(run_dir)["state"] == "running"  # it died: nobody wrote an end state

    # DeepSpeed's own consolidation follows `latest` and reads the previous checkpoint
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    assert "model.embed_tokens.weight" in sd and len(sd) > 10

    # resuming starts from step 3 and reproduces the uninterrupted run
    p2 = run_train(*args)
    assert f"resumed from {ckpt / 'step_00000003'} at step 3" in p2.stderr
    assert status(run_dir)["state"] == "done"
    got = losses(run_dir)
    assert got == ref, {s: (got.get(s), ref[s]) for s in ref if got.get(s) != ref[s]}
    # keep-last-2 of complete checkpoints; the half-written one is gone
    tags = sorted(d.name for d in ckpt.iterdir() if d.is_dir())
    assert tags == ["step_00000009", "step_00000010"], tags
    assert all((ckpt / t / "megasleep.json").is_file() for t in tags)
    assert (ckpt / "latest").read_text().strip() == "step_00000010"
