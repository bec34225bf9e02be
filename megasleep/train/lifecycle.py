"""When a run stops, and what it says about itself: stop policy and ``status.json``.

Contract: :class:`StopPolicy` turns SIGTERM / SIGUSR1 / SIGINT, a ``STOP`` file in the run directory
and ``train.time_limit_minutes`` into a stop reason (the trainer all-reduces the flag at the end of
every step, saves, and returns "preempted" / "time_limit"), and ``train.time_budget_minutes`` into
"end training here". :class:`RunStatus` writes ``status.json`` atomically on rank 0: ``running``,
then exactly one of ``done`` / ``preempted`` / ``time_limit`` / ``failed``; every crash path of
``megasleep.train.cli.run`` writes ``failed`` (``launch/pretrain.sh`` reads it to decide whether
to requeue). See docs/training.md.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from megasleep.atomic import atomic_write

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopPolicy:
    def __init__(self, run_dir: Path, rank: int, t_start: float, time_limit_minutes: float | None,
                 time_budget_minutes: float | None):
        self.run_dir, self.rank, self.t_start = Path(run_dir), rank, t_start
        self.time_limit_minutes, self.time_budget_minutes = time_limit_minutes, time_budget_minutes
        self.reason: str | None = None

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self.reason = signal.Signals(signum).name

        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)

    def clear_stale_stop_file(self) -> None:
        """A STOP left by an earlier, stopped run is stale; one written after this launch started
        (launch/pretrain.sh exports MEGASLEEP_LAUNCH_TIME) is a preemption that came early."""
        stop = self.run_dir / "STOP"
        launched = float(os.environ.get("MEGASLEEP_LAUNCH_TIME", self.t_start))
        if stop.exists() and stop.stat().st_mtime < launched:
            stop.unlink()

    def wants_stop(self) -> bool:
        """This rank's view (signals, STOP file on rank 0, time limit); the trainer all-reduces it."""
        if self.reason is None and self.rank == 0 and (self.run_dir / "STOP").exists():
            self.reason = "STOP file"
        limit = self.time_limit_minutes
        if self.reason is None and limit and time.time() - self.t_start > 60 * limit:
            self.reason = "time_limit"
        return self.reason is not None

    def budget_spent(self) -> bool:
        """Rank 0 decides (one clock), the trainer all-reduces it."""
        budget = self.time_budget_minutes
        return bool(self.rank == 0 and budget and time.time() - self.t_start > 60 * budget)


class RunStatus:
    """``status.json`` of a run (rank 0 writes; other ranks hold a no-op)."""

    def __init__(self, run_dir: Path, rank: int, steps: int, world: int):
        self.run_dir, self.rank, self.steps, self.world = Path(run_dir), rank, steps, world
        self.step = 0
        self.started = False  # "running" written: from then on every end writes a final state

    def write(self, state: str, **extra) -> None:
        if self.rank != 0:
            return
        rec = {"state": state, "step": self.step, "steps": self.steps, "time": time.time(),
               "world_size": self.world, **extra}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.run_dir / "status.json", json.dumps(rec, indent=1))
        self.started = True

    def fail(self, exc: BaseException) -> None:
        """A crash after the run started: ``failed`` with the reason (never raises: it runs on the way
        out of an exception)."""
        if not self.started:
            return
        try:
            self.write("failed", reason=f"{type(exc).__name__}: {exc}".strip()[:2000])
        except OSError:
            pass


def unmark_checkpoint(ckpt_dir: Path, step: int) -> None:
    """Make checkpoint ``step`` unresumable (its completion marker renamed ``*.diverged``, files kept
    for a post-mortem) and point ``latest`` back at the newest complete checkpoint before it."""
    from megasleep.train.checkpoint import LATEST, MARKER, complete_tags, tag_for

    tag_dir = Path(ckpt_dir) / tag_for(step)
    if (tag_dir / MARKER).is_file():
        (tag_dir / MARKER).rename(tag_dir / (MARKER + ".diverged"))
    tags = complete_tags(Path(ckpt_dir))
    latest = Path(ckpt_dir) / LATEST
    if tags:
        atomic_write(latest, tags[-1])
    else:
        latest.unlink(missing_ok=True)


def check_steps_on_resume(cfg, saved_steps: int | None, report: bool) -> None:
    """The lr schedule is planned over train.steps: a resume at another length would silently jump to
    another point of another schedule. Refuse, unless checkpoint.allow_steps_change says to re-plan
    (then say so). Checkpoints that do not record their train.steps pass."""
    from megasleep.train.checkpoint import CheckpointError

    steps = cfg.train.steps
    if saved_steps is None or saved_steps == steps:
        return
    if not cfg.checkpoint.allow_steps_change:
        raise CheckpointError(
            f"{cfg.source}: train.steps={steps} but the checkpoint was trained with train.steps={saved_steps}: "
            f"resuming would re-plan the lr schedule; set train.steps={saved_steps}, or "
            "checkpoint.allow_steps_change=true to continue on a schedule re-planned over the new length")
    if report:
        print(f"[megasleep] train.steps changed from {saved_steps} to {steps} (checkpoint.allow_steps_change=true): "
              "the lr schedule is re-planned over the new length from the checkpoint's step on",
              file=sys.stderr, flush=True)
