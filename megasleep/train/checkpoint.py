"""Checkpoints: DeepSpeed's ``save_checkpoint`` plus what makes them safe to resume from.

Layout of ``<run_dir>/checkpoints/``::

    step_00000200/                  DeepSpeed files (mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...)
        megasleep_rank00000.pt      per-rank state: data-loader state, RNG states (torch, cuda, numpy, python)
        megasleep.json              completion marker, written by rank 0 after every rank finished
    step_00000300/ ...
    latest                          the tag of the newest complete checkpoint (DeepSpeed's format)
    zero_to_fp32.py                 DeepSpeed's consolidation script (copied by DeepSpeed)

Protocol: every rank writes its DeepSpeed shards and its ``megasleep_rank*.pt``; the ranks agree
that every write succeeded (an all-reduce, so a full disk on one rank stops all of them with one
line that says the disk is full); rank 0 writes ``megasleep.json`` and then switches ``latest``
(both through :func:`megasleep.atomic.atomic_path`: write ``.tmp``, fsync, ``os.replace``). A process killed at any
point before the switch leaves ``latest`` naming the previous checkpoint, which is untouched; the half-written directory has no marker, is never loaded,
and is deleted by the next successful save. ``latest`` has DeepSpeed's format (a bare tag), so
DeepSpeed's ``load_checkpoint`` and ``zero_to_fp32.py`` read it too. Keep-last-k counts complete
checkpoints only and never deletes the one ``latest`` names.

The step, tokens seen, random-N sampler settings and the resolved experiment config go into
DeepSpeed's ``client_state``; the marker also records what the model was trained on (``data``: the
task and its parameters, or the shard sets) for evaluation defaults.

Loading checks the checkpoint against the run from its marker first (model config, world size vs.
data source: :func:`check_compatible`, also run by the trainer's preflight before any rank starts),
verifies every file weights-only (``megasleep.checkpoint.trust``), and reshards ZeRO state saved by
another number of ranks (``megasleep.train.reshard``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# CheckpointError lives with the other checkpoint errors, so train.reshard raises it without importing this
# module back (no import circle); importing it from here keeps working
from megasleep.atomic import atomic_path, atomic_write  # noqa: F401 (atomic_write: re-exported)
from megasleep.checkpoint.errors import CheckpointError  # noqa: F401

MARKER = "megasleep.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8,})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"megasleep_rank{rank:05d}.pt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def disk_full_message(exc: BaseException, where: Path) -> str | None:
    """'the disk is full ...' if ``exc`` is (or most likely is) a write failing for lack of space.

    Python reports ENOSPC / EDQUOT as OSError; PyTorch's zip writer only says "file write failed",
    so for that one we look at the free space left."""
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    left = f"{free / 2**30:.2f} GiB left on the file system of {probe}" if free is not None else "free space unknown"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({os.strerror(exc.errno)}; {left})"
    text = str(exc)
    if "No space left" in text or "Disk quota exceeded" in text:
        return f"the disk is full ({left})"
    if "write failed" in text and free is not None and free < 2**30:
        return f"writing failed, most likely because the disk is full ({left})"
    return None


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


def data_record(config: dict | None) -> dict | None:
    """What the checkpoint was trained on, for evaluation defaults: the task and its parameters
    (``data.source: task``) or the shard sets (``data.source: shards``)."""
    data = (config or {}).get("data")
    if not isinstance(data, dict):
        return None
    if data.get("source") == "task":
        return {"source": "task", "task": dict(data.get("task") or {})}
    return {"source": data.get("source"), "train": data.get("train"), "val": data.get("val"),
            "tokenizer": data.get("tokenizer")}


def check_compatible(tag_dir: Path, marker: dict, model_cfg: dict | None, world: int,
                     data_source: str | None, zero_stage: int | None = None) -> None:
    """Refuse, in one line and before DeepSpeed reads a byte, a checkpoint this run cannot continue.

    ``zero_stage`` None: not known yet (the preflight, before DeepSpeed's config is built)."""
    saved_cfg = marker.get("config") or {}
    saved = saved_cfg.get("model")
    if model_cfg is not None and isinstance(saved, dict) and saved != model_cfg:
        diff = sorted(k for k in set(saved) | set(model_cfg) if saved.get(k) != model_cfg.get(k))
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {model_cfg.get(k)!r}" for k in diff[:4])
        raise CheckpointError(f"{tag_dir}: saved with another model config ({shown}{' ...' if len(diff) > 4 else ''}); "
                              "resume with the same model, or set checkpoint.resume=never (or init_from an export)")
    saved_world = marker.get("world_size")
    saved_source = (saved_cfg.get("data") or {}).get("source")
    if saved_world != world and "shards" in (saved_source, data_source):
        raise CheckpointError(
            f"{tag_dir}: saved by {saved_world} ranks reading shards, this run has {world}: each rank's shard "
            "reader position only fits its own world size. Resume with the same number of ranks, or start a "
            "new run from its weights (checkpoint.init_from=<megasleep export of it>)")
    saved_zero = marker.get("zero_stage")
    same_kind = {saved_zero, zero_stage} <= {1, 2}  # one optimizer class and file format for ZeRO-1 and 2
    if zero_stage is not None and saved_zero is not None and saved_zero != zero_stage and not same_kind:
        raise CheckpointError(f"{tag_dir}: saved with ZeRO-{saved_zero}, this run uses ZeRO-{zero_stage}; the number "
                              f"of ranks may change on resume, the ZeRO stage may not: set deepspeed.zero_stage={saved_zero}")
    optim = (saved_cfg.get("optim") or {}).get("name")
    if saved_world != world and saved_zero and optim == "muon":
        raise CheckpointError(
            f"{tag_dir}: saved by {saved_world} ranks with ZeRO-{saved_zero} and Muon; DeepSpeed's universal "
            "checkpoint (how we reshard) only carries Adam moments, not Muon's momentum. Resume with "
            f"{saved_world} ranks, or start from its weights (checkpoint.init_from=<megasleep export of it>)")


def preflight_resume(spec: str, default_dir: Path, model_cfg: dict | None, world: int,
                     data_source: str | None) -> tuple[Path, str] | None:
    """resolve_resume plus the compatibility check, from the marker alone (no process group needed)."""
    found = resolve_resume(spec, default_dir)
    if found is not None:
        tag_dir = found[0] / found[1]
        check_compatible(tag_dir, read_marker(tag_dir), model_cfg, world, data_source)
    return found


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, keep_last: int, rank: int, world: int, barrier, fault=None,
                 trust: bool = False):
        self.dir, self.keep_last, self.rank, self.world = Path(ckpt_dir), keep_last, rank, world
        self.barrier = barrier
        self.fault = fault
        self.trust = trust

    def _all_ok(self, ok: bool) -> bool:
        """Every rank's verdict (a failed write on one rank must stop all, not hang the others)."""
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            on_gpu = dist.get_backend() == "nccl"
            flag = torch.tensor([1 if ok else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item())
        return ok

    def save(self, engine, step: int, client_state: dict, rank_state: dict, extra_marker: dict | None = None) -> str:
        tag = tag_for(step)
        tag_dir = self.dir / tag
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # leftovers of an earlier, interrupted save of the same step
                shutil.rmtree(tag_dir)
        self.barrier()
        t0 = time.perf_counter()
        error = None
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            atomic_torch_save(rank_state, tag_dir / rank_file(self.rank))
        except (OSError, RuntimeError) as exc:
            error = exc
        if not self._all_ok(error is None):
            self._failed_save(tag_dir, error)
        if self.fault is not None and step in self.fault.pause_in_save_steps and self.rank == 0:
            (self.dir / ".saving").write_text(tag)  # fault injection: a window in which to kill us
            time.sleep(self.fault.pause_in_save_seconds)
        if self.rank == 0:
            files = sorted(p.name for p in tag_dir.iterdir() if p.is_file())
            missing = [rank_file(r) for r in range(self.world) if rank_file(r) not in files]
            if missing:
                raise CheckpointError(f"{tag_dir}: ranks did not write {missing}")
            extra = dict(extra_marker or {})
            marker = {"step": step, "tag": tag, "world_size": self.world, "time": time.time(),
                      "seconds": round(time.perf_counter() - t0, 3), "files": files,
                      "data": data_record(extra.get("config")), **extra}
            try:
                atomic_write(tag_dir / MARKER, json.dumps(marker, indent=1))
                atomic_write(self.dir / LATEST, tag)
            except OSError as exc:
                self._failed_save(tag_dir, exc, sync=False)  # the other ranks are past their writes
            (self.dir / ".saving").unlink(missing_ok=True)
            self.prune(keep=tag)
        self.barrier()
        return tag

    def _failed_save(self, tag_dir: Path, error: BaseException | None, sync: bool = True) -> None:
        """Drop the half-written checkpoint and raise one line that says why (``latest`` untouched)."""
        if sync:
            self.barrier()
        if self.rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        prev = find_latest(self.dir)
        kept = f"the previous checkpoint {self.dir / prev} is intact" if prev else "no earlier checkpoint exists"
        if error is None:
            raise CheckpointError(f"{tag_dir}: another rank failed to write its part of this checkpoint; {kept}")
        why = disk_full_message(error, tag_dir) or f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        raise CheckpointError(f"{tag_dir}: saving failed: {why}; {kept}. Free space (or set checkpoint.dir "
                              "elsewhere) and run the same command again to resume")

    def prune(self, keep: str) -> None:
        """Delete complete checkpoints beyond keep_last and incomplete ones older than ``keep``."""
        step_of = {p.name: int(TAG_RE.match(p.name).group(1)) for p in self.dir.iterdir()
                   if p.is_dir() and TAG_RE.match(p.name)}
        complete = [t for t in sorted(step_of, key=step_of.get) if is_complete(self.dir / t)]
        doomed = set(complete[:-self.keep_last]) if len(complete) > self.keep_last else set()
        doomed |= {t for t in step_of if t not in complete and step_of[t] < step_of[keep]}
        for t in sorted(doomed - {keep}):
            shutil.rmtree(self.dir / t, ignore_errors=True)

    def load(self, engine, ckpt_dir: Path, tag: str, load_optimizer: bool = True,
             model_cfg: dict | None = None, data_source: str | None = None) -> tuple[dict, dict]:
        """Load a complete checkpoint saved by any number of ranks: checked against this run (model,
        world size vs. data source), verified weights-only, then read by DeepSpeed (resharded through
        DeepSpeed's universal format when the world size or ZeRO partitioning differs)."""
        from megasleep.checkpoint.trust import safe_load, verify_checkpoint
        from megasleep.train.reshard import load_resharded, old_rank_for

        tag_dir = Path(ckpt_dir) / tag
        if not is_complete(tag_dir):
            raise CheckpointError(f"{tag_dir}: incomplete checkpoint (no {MARKER})")
        marker = read_marker(tag_dir)
        zero_now = int(engine.zero_optimization_stage())
        check_compatible(tag_dir, marker, model_cfg, self.world, data_source, zero_now)
        verify_checkpoint(tag_dir, self.trust)
        if self.rank == 0 and Path(ckpt_dir).resolve() != self.dir.resolve():
            print(f"[megasleep] resuming from {tag_dir}, outside this run's checkpoint directory {self.dir}",
                  file=sys.stderr, flush=True)
        saved_world = int(marker.get("world_size") or self.world)
        zero = int(marker.get("zero_stage", 0) or 0)
        if zero > 0 and saved_world != self.world:
            if self.rank == 0:
                print(f"[megasleep] {tag_dir} was saved by {saved_world} rank(s); resharding its ZeRO-{zero} "
                      f"state for {self.world} rank(s) (DeepSpeed universal checkpoint)", file=sys.stderr, flush=True)
            client = load_resharded(engine, Path(ckpt_dir), tag, self.dir, self.rank, self.barrier, load_optimizer,
                                    trust=self.trust)
        else:
            path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=load_optimizer,
                                                  load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        rank_state = safe_load(tag_dir / rank_file(old_rank_for(self.rank, saved_world)), self.trust)
        return client or {}, rank_state
