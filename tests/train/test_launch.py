"""The launch scripts' decisions, checked without a cluster: SLURM's variables are set by hand.

tests/train/test_slurm.py runs the same scripts under a real (local, 2-node) SLURM; these tests pin
the rules that a 2-CPU cluster without GPUs cannot show: which GPU each rank of a one-task-per-GPU
job takes, how the submission shape is told apart, the preemption-margin warning, and the refusal
of a GPU request on a machine where torch sees no GPU.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
import torch

from tests.train.helpers import PY, ROOT, env

COMMON = ROOT / "launch" / "common.sh"
TASK = ROOT / "launch" / "slurm-task.sh"


def bash(script: str, **extra) -> subprocess.CompletedProcess:
    e = env(**extra)
    for k in [k for k in e if k.startswith("SLURM") or k == "CUDA_VISIBLE_DEVICES"]:
        if k not in extra:
            del e[k]
    return subprocess.run(["bash", "-c", script], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


def common(body: str, **extra) -> subprocess.CompletedProcess:
    return bash(f'ROOT={ROOT}; MS_NAME=test; PYTHON={PY}; source {COMMON}; {body}', **extra)


def task(**slurm) -> subprocess.CompletedProcess:
    base = dict(SLURM_PROCID="0", SLURM_NTASKS="4", SLURM_LOCALID="0", SLURM_NODEID="0",
                SLURM_STEP_TASKS_PER_NODE="2(x2)", SLURMD_NODENAME="n1", MEGASLEEP_DRY_RUN="1")
    base.update(slurm)
    return bash(f"bash {TASK} true", **base)


def fields(line: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


@pytest.mark.parametrize("procid,localid,nodeid,cvd", [("1", "1", "0", "1"), ("3", "1", "1", "1"),
                                                       ("2", "0", "1", "0")])
def test_task_bound_to_one_gpu_uses_that_gpu(procid, localid, nodeid, cvd):
    """--gpus-per-task=1: SLURM shows each task only its GPU (CUDA_VISIBLE_DEVICES=<its index>), so
    cuda:0 is the task's own GPU, whatever its local id; RANK/WORLD_SIZE come from SLURM."""
    p = task(SLURM_PROCID=procid, SLURM_LOCALID=localid, SLURM_NODEID=nodeid, CUDA_VISIBLE_DEVICES=cvd,
             MEGASLEEP_DEVICE="cuda")
    assert p.returncode == 0, p.stderr
    f = fields(p.stdout)
    assert (f["RANK"], f["LOCAL_RANK"], f["WORLD_SIZE"], f["LOCAL_WORLD_SIZE"]) == (procid, "0", "4", "2")
    assert f["CUDA_VISIBLE_DEVICES"] == cvd


def test_task_seeing_every_gpu_of_its_node_takes_its_local_id():
    """--ntasks-per-node=2 --gpus-per-node=2 (no per-task binding): each task sees both GPUs and takes
    the one at its local id, so the two ranks of a node never share a GPU."""
    got = {}
    for local in ("0", "1"):
        p = task(SLURM_PROCID=local, SLURM_LOCALID=local, CUDA_VISIBLE_DEVICES="0,1", MEGASLEEP_DEVICE="cuda")
        assert p.returncode == 0, p.stderr
        got[local] = fields(p.stdout)["LOCAL_RANK"]
    assert got == {"0": "0", "1": "1"}


def test_task_with_gpus_not_matching_tasks_is_refused_in_one_line():
    p = task(CUDA_VISIBLE_DEVICES="0,1,2,3", MEGASLEEP_DEVICE="cuda")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "sees 4 GPU(s)" in p.stderr and "2 task(s)" in p.stderr, p.stderr


def test_uneven_tasks_per_node_are_counted_per_node():
    """--ntasks=3 over 2 nodes: SLURM_STEP_TASKS_PER_NODE=2,1; the task on the second node is alone."""
    p = task(SLURM_PROCID="2", SLURM_NTASKS="3", SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="2,1",
             MEGASLEEP_DEVICE="cpu")
    f = fields(p.stdout)
    assert (f["RANK"], f["LOCAL_RANK"], f["WORLD_SIZE"], f["LOCAL_WORLD_SIZE"]) == ("2", "0", "3", "1")


PLAN = 'ms_plan; echo "$SHAPE $DEVICE $NNODES $NPROC $WORLD $CPUS_PER_RANK"'


@pytest.mark.parametrize("slurm,want", [
    # sbatch --nodes=2 --ntasks-per-node=1 (CPU nodes, 2 CPU ranks each via MEGASLEEP_CPU_RANKS)
    (dict(SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
          SLURM_CPUS_ON_NODE="8", MEGASLEEP_CPU_RANKS="2"), "node cpu 2 2 4 4"),
    # sbatch --nodes=2 --ntasks-per-node=4 (one task per rank, no GPUs)
    (dict(SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_NTASKS="8", SLURM_NTASKS_PER_NODE="4",
          SLURM_CPUS_ON_NODE="8"), "task cpu 2 4 8 2"),
    # sbatch --nodes=1 --ntasks=1 --gpus-per-task=1: one task, but the per-task shape
    (dict(SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_NTASKS="1", SLURM_GPUS_PER_TASK="1",
          SLURM_CPUS_ON_NODE="4", MEGASLEEP_DRY_RUN="1", SLURM_GPUS_ON_NODE="1"), "task cuda 1 1 1 4"),
    # no SLURM at all, MEGASLEEP_CPU_RANKS=2
    (dict(MEGASLEEP_CPU_RANKS="2"), "node cpu 1 2 2"),
])
def test_plan_tells_the_submission_shapes_apart(slurm, want):
    p = common(PLAN, **slurm)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[:len(want.split())] == want.split(), p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a usable GPU")
def test_gpu_request_where_torch_sees_no_gpu_is_one_line():
    p = common(PLAN, SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_NTASKS="1", SLURM_GPUS_ON_NODE="2",
               CUDA_VISIBLE_DEVICES="0,1", SLURMD_NODENAME="gpu-node-3")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1, p.stderr
    assert "given 2 GPU(s) on gpu-node-3" in p.stderr and "--gpus-per-node=0" in p.stderr


@pytest.mark.parametrize("text,seconds", [("4:59", 299), ("1:02:03", 3723), ("2-00:00:00", 172800),
                                          ("1-01", 90000), ("UNLIMITED", None), ("INVALID", None)])
def test_slurm_durations(text, seconds):
    out = common(f'ms_seconds "{text}"').stdout.strip()
    assert out == ("" if seconds is None else str(seconds))


def test_signal_margin_sources(tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=1:00:00\n#SBATCH --signal=B:USR1@450\necho\n")
    assert common(f"ms_signal_margin {script}").stdout.strip() == "450"
    assert common(f"ms_signal_margin {script}", SBATCH_SIGNAL="B:USR1@90").stdout.strip() == "90"
    assert common(f"ms_signal_margin {script}", MEGASLEEP_SIGNAL_MARGIN="30").stdout.strip() == "30"
    script.write_text("#!/bin/bash\n#SBATCH --signal=B:USR1\n")
    assert common(f"ms_signal_margin {script}").stdout.strip() == "60"  # sbatch's default margin
    # the shipped scripts: 300 s
    assert common(f"ms_signal_margin {ROOT}/launch/pretrain.sh").stdout.strip() == "300"


def test_margin_shorter_than_the_last_save_warns():
    warn = common('SAVE_SECONDS=412.5; ms_check_margin 300 "the preemption margin"')
    assert warn.returncode == 0 and "warning" in warn.stderr and "412.5s" in warn.stderr, warn.stderr
    quiet = common('SAVE_SECONDS=12.5; ms_check_margin 300 "the preemption margin"')
    assert quiet.stderr == ""
    unknown = common('SAVE_SECONDS=; ms_check_margin 300 "the preemption margin"')  # no checkpoint yet
    assert unknown.stderr == ""


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_run_info_reports_the_last_measured_save(tmp_path):
    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "megasleep.json").write_text('{"step": 4, "world_size": 2, "seconds": 7.25}')
    (run / "checkpoints" / "latest").write_text("step_00000004")
    p = subprocess.run([PY, str(ROOT / "launch" / "run_info.py"), f"run_dir={run}"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [str(run), str(run / "checkpoints"), "7.25"]
    bad = subprocess.run([PY, str(ROOT / "launch" / "run_info.py"), "train.no_such_key=1"], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr and bad.stderr.count("\n") == 1, bad.stderr


@pytest.mark.parametrize("script", ["pretrain.sh", "eval.sh"])
@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_batch_that_cannot_divide_is_refused_before_any_rank_starts(tmp_path, script):
    """3 CPU ranks cannot split 8 sequences into micro-batches of 4: one line naming the config and
    the world size, exit 2, and no rank ever ran (no run directory)."""
    run = tmp_path / "run"
    p = subprocess.run(["bash", f"launch/{script}", "train.global_batch_size=8", "train.micro_batch_size=4",
                        f"run_dir={run}"], cwd=ROOT, env=env(MEGASLEEP_CPU_RANKS="3"), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "preflight for 3 rank(s)" in lines[0] and "tiny-demo.yaml" in lines[0], p.stderr
    assert "world size 3" in lines[0] and "not divisible" in lines[0], lines[0]
    assert not run.exists()


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_usr1_during_the_checks_does_not_kill_the_script(tmp_path):
    """USR1 can arrive while the config check and preflight run (seconds, before any rank): bash's
    default would end the job there, unsaved and not requeued. Without SLURM the request is kept:
    the ranks start, stop at the first step with a checkpoint, and the script exits 0."""
    run = tmp_path / "run"
    p = subprocess.Popen(["bash", "launch/pretrain.sh", "train.steps=4", "train.global_batch_size=4",
                          "train.micro_batch_size=4", "optim.warmup_steps=1", "eval.at_end=false",
                          "logging.tensorboard=false", "checkpoint.export=false", f"run_dir={run}"],
                         cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # traps are set within milliseconds; the checks take seconds
    assert p.poll() is None and not run.exists(), "the checks finished before the signal: nothing tested"
    p.send_signal(signal.SIGUSR1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert "USR1: asking the trainer" in out and "state preempted" in out, out + err
    assert (run / "checkpoints" / "latest").is_file()
