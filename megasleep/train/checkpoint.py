"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus what makes them safe to resume from.

Layout of ``<run_dir>/checkpoints/``::

    step_00000200/                  DeepSpeed files (mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...)
        megasleep_rank00000.pt      per-rank state: data-loader state, RNG states (torch, cuda, numpy, python)
        megasleep.json              completion marker, written by rank 0 after every rank finished
    step_00000300/ ...
    latest                          the tag of the newest complete checkpoint (DeepSpeed's format)
    zero_to_fp32.py                 DeepSpeed's consolidation script (copied by DeepSpeed)

Protocol: every rank writes its DeepSpeed shards and its ``megasleep_rank*.pt``; a barrier; rank 0
writes ``megasleep.json`` and then switches ``latest`` atomically (write ``latest.tmp``, fsync,
``os.replace``). A process killed at any point before the switch leaves ``latest`` naming the
previous checkpoint, which is untouched; the half-written directory has no marker, is never loaded,
and is deleted by the next successful save. ``latest`` has DeepSpeed's format (a bare tag), so
DeepSpeed's ``load_checkpoint`` and ``zero_to_fp32.py`` read it too. Keep-last-k counts complete
checkpoints only and never deletes the one ``latest`` names.

The step, tokens seen, random-N sampler settings and the resolved experiment config go into
DeepSpeed's ``client_state``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "megasleep.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, incomplete, or saved by a different world size)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"megasleep_rank{rank:05d}.pt"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def read_marker(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MARKER).read_text())


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoints in ``ckpt_dir``, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name) and is_complete(p)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def find_latest(ckpt_dir: Path) -> str | None:
    """The tag that ``latest`` names if that checkpoint is complete, else the newest complete one."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(ckpt_dir / tag):
            return tag
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def resolve_resume(spec: str, default_dir: Path) -> tuple[Path, str] | None:
    """``checkpoint.resume`` -> (checkpoint dir, tag) or None (start fresh).

    'auto': the run's own directory if it holds a complete checkpoint; 'never': None; anything else
    is a path (a checkpoints dir or one tag dir) that must exist and hold a complete checkpoint.
    """
    if spec == "never":
        return None
    if spec == "auto":
        tag = find_latest(default_dir)
        return (default_dir, tag) if tag else None
    p = Path(spec)
    if not p.exists():
        raise CheckpointError(f"checkpoint.resume: {p}: no such checkpoint directory")
    if is_complete(p):
        return p.parent, p.name
    if TAG_RE.match(p.name) and p.is_dir():
        raise CheckpointError(f"checkpoint.resume: {p}: incomplete checkpoint (no {MARKER}); "
                              f"complete ones in {p.parent}: {complete_tags(p.parent) or 'none'}")
    tag = find_latest(p)
    if tag is None:
        raise CheckpointError(f"checkpoint.resume: {p}: holds no complete checkpoint "
                              f"(expected step_*/{MARKER} and a '{LATEST}' file)")
    return p, tag


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, keep_last: int, rank: int, world: int, barrier, fault=None):
        self.dir, self.keep_last, self.rank, self.world = Path(ckpt_dir), keep_last, rank, world
        self.barrier = barrier
        self.fault = fault

    def save(self, engine, step: int, client_state: dict, rank_state: dict, extra_marker: dict | None = None) -> str:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # leftovers of an earlier, interrupted save of the same step
                shutil.rmtree(tag_dir)
        self.barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
        tmp = tag_dir / (rank_file(self.rank) + ".tmp")
        torch.save(rank_state, tmp)
        os.replace(tmp, tag_dir / rank_file(self.rank))
        self.barrier()
        if self.fault is not None and step in self.fault.pause_in_save_steps and self.rank == 0:
            (self.dir / ".saving").write_text(tag)  # fault injection: a window in which to kill us
            time.sleep(self.fault.pause_in_save_seconds)
        if self.rank == 0:
            files = sorted(p.name for p in tag_dir.iterdir() if p.is_file())
            missing = [rank_file(r) for r in range(self.world) if rank_file(r) not in files]
            if missing:
                raise CheckpointError(f"{tag_dir}: ranks did not write {missing}")
            marker = {"step": step, "tag": tag, "world_size": self.world, "time": time.time(),
                      "seconds": round(time.perf_counter() - t0, 3), "files": files, **(extra_marker or {})}
            _fsync_write(tag_dir / MARKER, json.dumps(marker, indent=1))
            _fsync_write(self.dir / LATEST, tag)
            (self.dir / ".saving").unlink(missing_ok=True)
            self.prune(keep=tag)
        self.barrier()
        return tag

    def prune(self, keep: str) -> None:
        """Delete complete checkpoints beyond keep_last and incomplete ones older than ``keep``."""
        step_of = {p.name: int(TAG_RE.match(p.name).group(1)) for p in self.dir.iterdir()
                   if p.is_dir() and TAG_RE.match(p.name)}
        complete = [t for t in sorted(step_of, key=step_of.get) if is_complete(self.dir / t)]
        doomed = set(complete[:-self.keep_last]) if len(complete) > self.keep_last else set()
        doomed |= {t for t in step_of if t not in complete and step_of[t] < step_of[keep]}
        for t in sorted(doomed - {keep}):
            shutil.rmtree(self.dir / t, ignore_errors=True)

    def load(self, engine, ckpt_dir: Path, tag: str, load_optimizer: bool = True) -> tuple[dict, dict]:
        tag_dir = Path(ckpt_dir) / tag
        if not is_complete(tag_dir):
            raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {MARKER})")
        marker = read_marker(tag_dir)
        if marker.get("world_size") != self.world:
            raise CheckpointError(
                f"{tag_dir} was saved by {marker.get('world_size')} ranks and this run has {self.world}: "
                "DeepSpeed's partitioned optimizer states do not reshard. Resume with the same number of "
                "ranks, or start a new run from the consolidated weights (megasleep export / zero_to_fp32).")
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        rank_state = torch.load(tag_dir / rank_file(self.rank), map_location="cpu", weights_only=False)
        return client or {}, rank_state
