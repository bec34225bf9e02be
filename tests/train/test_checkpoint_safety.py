"""Checkpoint safety: planted pickles never run, clear refusals, a full disk, what the marker records.

* a payload planted in a training checkpoint (it writes a marker file when unpickled) does not run
  through resume, --eval-only or `megasleep export`; it does with --trust-checkpoint;
* a different model config is refused in one line before DeepSpeed loads anything;
* ENOSPC during a save: the previous checkpoint stays intact and the error says the disk is full;
* the marker records the task and its parameters.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megasleep.checkpoint.trust import UntrustedCheckpoint, safe_load, verify_checkpoint
from megasleep.train.checkpoint import CheckpointError, CheckpointManager, find_latest
from tests.train.helpers import FAST, PY, ROOT, env, train_cmd

PLANTED = "MEGASLEEP_PLANTED_MARKER"


class Payload:
    """Unpickling this calls os.system: the marker file appears iff the pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path) -> None:
    """Add the payload to a real checkpoint file (so a trusted load still finds what it needs)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    obj["planted"] = Payload(marker)
    torch.save(obj, path)


def run(*args: str, cmd: str = "train") -> subprocess.CompletedProcess:
    full = train_cmd(*args) if cmd == "train" else [PY, "-m", "megasleep.cli", cmd, *args]
    return subprocess.run(full, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


@pytest.fixture
def copied_run(reference_run, tmp_path):
    run_dir, _ = reference_run
    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    return dst


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_own_checkpoints_load_weights_only(reference_run):
    run_dir, _ = reference_run
    tag_dir = run_dir / "checkpoints" / "step_00000010"
    assert verify_checkpoint(tag_dir) >= 3  # model states, optimizer shard, megasleep_rank00000.pt
    state = safe_load(tag_dir / "megasleep_rank00000.pt")
    assert state["step"] == 10 and "rng" in state


def test_planted_payload_is_refused_unless_trusted(tmp_path):
    marker = tmp_path / "ran"
    f = tmp_path / "x.pt"
    torch.save({"w": torch.ones(2), "p": Payload(marker)}, f)
    with pytest.raises(UntrustedCheckpoint, match=r"x\.pt: contains pickled globals \['posix\.system'\].*--trust-checkpoint"):
        safe_load(f)
    assert not marker.exists()
    safe_load(f, trust=True)
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["megasleep_rank00000.pt", "mp_rank_00_model_states.pt",
                                   "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_payload_does_not_run_through_resume_eval_or_export(copied_run, tmp_path, where):
    tag_dir = copied_run / "checkpoints" / "step_00000010"
    marker = tmp_path / PLANTED
    plant(tag_dir / where, marker)
    base = [*FAST, f"run_dir={copied_run}"]  # resume at step 10 of 10: loads, then nothing to train
    for p in (run(*base), run(*base, "--eval-only"),
              run(str(copied_run), "--out", str(tmp_path / "export"), cmd="export")):
        line = one_line_error(p)
        assert where in line and "--trust-checkpoint" in line, line
        assert not marker.exists(), f"the planted payload ran: {p.args}"
    # explicitly trusted: DeepSpeed's own unpickling runs it (which is what the flag means)
    p = run(*base, "eval.samples=16", "--eval-only", "--trust-checkpoint")
    assert p.returncode == 0, p.stderr[-3000:]
    assert marker.exists()


def test_other_model_config_is_refused_in_one_line_before_loading(copied_run):
    p = run(*FAST, f"run_dir={copied_run}", "model.d_model=96")
    line = one_line_error(p)
    assert "saved with another model config" in line and "d_model: 64 -> 96" in line, line


def test_shard_data_cannot_change_world_size(tmp_path):
    from megasleep.train.checkpoint import check_compatible

    marker = {"world_size": 2, "config": {"model": {"d_model": 64}, "data": {"source": "shards"}}}
    with pytest.raises(CheckpointError, match=r"step_1: saved by 2 ranks reading shards, this run has 1"):
        check_compatible(Path("step_1"), marker, {"d_model": 64}, 1, "shards")
    check_compatible(Path("step_1"), marker, {"d_model": 64}, 2, "shards")  # same world: fine


def test_muon_and_zero_stage_changes_are_refused():
    from megasleep.train.checkpoint import check_compatible

    muon = {"world_size": 2, "zero_stage": 1, "config": {"optim": {"name": "muon"}, "data": {"source": "task"}}}
    with pytest.raises(CheckpointError, match=r"s: saved by 2 ranks with ZeRO-1 and Muon"):
        check_compatible(Path("s"), muon, None, 1, "task")
    check_compatible(Path("s"), muon, None, 2, "task", 1)  # unchanged world and stage: a plain resume
    for saved, now in ((0, 2), (1, 3), (3, 2)):
        marker = {"world_size": 1, "zero_stage": saved, "config": {}}
        with pytest.raises(CheckpointError, match=rf"s: saved with ZeRO-{saved}, this run uses ZeRO-{now}; "):
            check_compatible(Path("s"), marker, None, 2, "task", now)
    check_compatible(Path("s"), {"world_size": 1, "zero_stage": 1, "config": {}}, None, 2, "task", 2)


class FakeEngine:
    """What CheckpointManager.save needs of a DeepSpeed engine: files in <dir>/<tag>/."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(3)}, **client_state}, d / "mp_rank_00_model_states.pt")


def test_disk_full_keeps_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    from megasleep.train import checkpoint as ck

    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1, barrier=lambda: None)
    mgr.save(FakeEngine(), 1, {"megasleep": {"step": 1}}, {"step": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_00000001").iterdir()}

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck.torch, "save", full)
    with pytest.raises(CheckpointError) as info:
        mgr.save(FakeEngine(), 2, {"megasleep": {"step": 2}}, {"step": 2})
    msg = str(info.value)
    assert "the disk is full" in msg and "step_00000001 is intact" in msg and "\n" not in msg, msg
    assert find_latest(tmp_path) == "step_00000001"
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_00000001").iterdir()} == before
    assert not (tmp_path / "step_00000002").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_marker_records_task_parameters(tmp_path):
    from megasleep.train.config import load_experiment

    cfg = load_experiment(None, ["data.task.params={n_strings: 1, width: 16}", "data.task.difficulty=2-5"])
    mgr = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1, barrier=lambda: None)
    mgr.save(FakeEngine(), 1, {}, {"step": 1}, {"config": cfg.resolved()})
    data = json.loads((tmp_path / "step_00000001" / "megasleep.json").read_text())["data"]
    assert data["source"] == "task"
    assert data["task"]["name"] == "rule110" and data["task"]["difficulty"] == "2-5"
    assert data["task"]["params"] == {"n_strings": 1, "width": 16}
