"""launch/pretrain.sh and launch/sweep.sh on a real (local, one-node) SLURM cluster.

The three jobs are submitted together and share the 2 CPUs (the local partition oversubscribes), so
the ~25 s requeue delay of the preemption test overlaps the others:

* `sbatch --wait launch/pretrain.sh` with 2 tasks trains the tiny config to completion;
* the same run sent USR1 mid-way (`scancel --batch --signal=USR1`, what --signal=B:USR1@... does
  before the time limit) checkpoints, requeues itself, resumes and ends with the same loss, step
  for step, as the uninterrupted run;
* `launch/sweep.sh` as a job array over N in {1, 2} writes one run directory per N, trained at that N.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.train.faults import fault_env
from tests.train.helpers import ROOT, env, losses, status, wait_for

SLURM = ROOT.parent / "shared" / "slurm"
pytestmark = pytest.mark.slurm

RUN = ["train.steps=8", "optim.warmup_steps=2", "train.log_every=1", "train.global_batch_size=8",
       "train.micro_batch_size=4",
       "eval.at_end=false", "logging.tensorboard=false", "logging.progress=false", "checkpoint.export=false"]
SWEEP = ["train.steps=3", "optim.warmup_steps=1", "train.log_every=1", "train.global_batch_size=4",
         "train.micro_batch_size=4",
         "eval.passes=[1,2]", "eval.samples=8", "logging.tensorboard=false", "checkpoint.export=false"]


def _cluster():
    start = SLURM / "start-local-cluster.sh"
    if not start.is_file():
        pytest.skip(f"no local SLURM cluster scripts at {SLURM} (they sit beside the checkout in dev and CI)")
    if os.geteuid() != 0:
        pytest.skip("starting the local SLURM cluster needs root (it installs and runs slurmctld/slurmd)")
    # `nproc` (which the script uses for CPUs=) honours OMP_NUM_THREADS: without this, a test process
    # with OMP_NUM_THREADS=1 would reconfigure the node down to 1 CPU and 2-task jobs never start
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT")}
    p = subprocess.run(["bash", str(start)], capture_output=True, text=True, timeout=300, env=e)
    assert p.returncode == 0, f"start-local-cluster.sh failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert shutil.which("sbatch"), "cluster started but sbatch is not on PATH"


def _submit(args: list[str], out: str, **extra_env: str) -> tuple[subprocess.Popen, str]:
    """sbatch --wait in the background; returns (process, job id)."""
    p = subprocess.Popen(["sbatch", "--wait", "--parsable", "--gpus-per-node=0", f"--output={out}", *args],
                         cwd=ROOT, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line:
        p.wait(30)
        raise AssertionError(f"sbatch refused the job: {p.stderr.read()}")
    return p, line.split(";")[0]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    _cluster()
    tmp = tmp_path_factory.mktemp("slurm")
    submitted: list[tuple[subprocess.Popen, str]] = []
    try:
        plain = _submit(["--ntasks-per-node=2", "launch/pretrain.sh", *RUN, f"run_dir={tmp}/plain"],
                        f"{tmp}/plain-%j.out")
        submitted.append(plain)
        pre = _submit(["--ntasks-per-node=2", "launch/pretrain.sh", *RUN, f"run_dir={tmp}/preempt"],
                      f"{tmp}/preempt-%j.out", **fault_env(step_sleep=1.5))
        submitted.append(pre)
        sweep = _submit(["--array=1,2", "--ntasks-per-node=1", "launch/sweep.sh", *SWEEP, f"run_dir={tmp}/sweep"],
                        f"{tmp}/sweep-%A_%a.out")
        submitted.append(sweep)
        # preempt mid-way: once step 2 is logged, send what --signal=B:USR1@... sends
        wait_for(lambda: 2 in losses(tmp / "preempt"), 300, "step 2 of the preempted job", proc=pre[0], poll=0.5)
        sig = subprocess.run(["scancel", "--batch", "--signal=USR1", pre[1]], capture_output=True, text=True)
        assert sig.returncode == 0, sig.stderr
        t0 = time.time()
        rcs = {}
        for name, (p, _job) in zip(("plain", "preempt", "sweep"), submitted):
            p.wait(timeout=max(60, 600 - (time.time() - t0)))
            rcs[name] = p.returncode
        yield tmp, rcs, {name: job for name, (_, job) in zip(("plain", "preempt", "sweep"), submitted)}
    finally:
        for p, job in submitted:
            if p.poll() is None:
                subprocess.run(["scancel", job], capture_output=True)
                p.kill()


def _log(tmp, prefix: str) -> str:
    return "\n".join(f.read_text() for f in sorted(tmp.glob(f"{prefix}-*.out")))


def test_sbatch_two_tasks_trains_to_completion(jobs):
    tmp, rcs, _ = jobs
    assert rcs["plain"] == 0, _log(tmp, "plain")
    st = status(tmp / "plain")
    assert st["state"] == "done" and st["step"] == 8 and st["world_size"] == 2, st
    got = losses(tmp / "plain")
    assert sorted(got) == list(range(1, 9)) and got[8] < got[1]
    assert "2 cpu rank(s)" in _log(tmp, "plain")


def test_usr1_checkpoints_requeues_and_resumes(jobs):
    tmp, rcs, ids = jobs
    log = _log(tmp, "preempt")
    assert rcs["preempt"] == 0, log
    assert "USR1: asking the trainer to checkpoint" in log and f"requeueing job {ids['preempt']}" in log, log
    assert "restart 1" in log and "resumed from" in log, log
    st = status(tmp / "preempt")
    assert st["state"] == "done" and st["step"] == 8, st
    # the same trajectory as the uninterrupted 2-rank run, step for step (exact on CPU)
    assert losses(tmp / "preempt") == losses(tmp / "plain")


def test_job_array_over_n(jobs):
    tmp, rcs, _ = jobs
    assert rcs["sweep"] == 0, _log(tmp, "sweep")
    for n in (1, 2):
        run = tmp / f"sweep-N{n}"
        assert status(run)["state"] == "done", _log(tmp, "sweep")
        cfg = (run / "config.yaml").read_text()
        assert f"passes: {n}\n" in cfg
        ev = json.loads((run / "eval.json").read_text())["results"]
        assert {r["passes"] for r in ev} == {1, 2}
    assert sorted(p.name for p in tmp.glob("sweep-N*") if p.is_dir()) == ["sweep-N1", "sweep-N2"]
