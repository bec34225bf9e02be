"""Shared helpers of the trainer tests: run `megasleep train` in a subprocess and read its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# A tiny, fast run of the built-in demo experiment (tiny AGAG model, Rule 110 t=1, L=24, ZeRO-1):
# 10 steps of 8 sequences (micro-batch 4, so 2 accumulation steps on one rank).
FAST = ["train.steps=10", "train.log_every=1", "train.global_batch_size=8", "train.micro_batch_size=4",
        "optim.warmup_steps=2", "eval.at_end=false", "logging.tensorboard=false", "logging.progress=false",
        "checkpoint.export=false"]


def pythonpath() -> str:
    """The repository first, then whatever PYTHONPATH already holds (an install by --target, say)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def env(**extra) -> dict:
    e = dict(os.environ)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")
    e.update(extra)
    return e


def train_cmd(*overrides: str, config: str | None = None) -> list[str]:
    return [PY, "-m", "megasleep.cli", "train", *([config] if config else []), *overrides]


def run_train(*overrides: str, config: str | None = None, timeout: float = 300, check: bool = True,
              extra_env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(train_cmd(*overrides, config=config), cwd=ROOT, env=env(**(extra_env or {})),
                       capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"megasleep train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from metrics.jsonl (log_every=1); a step logged twice (re-run after a kill) keeps
    the last value."""
    out: dict[int, float] = {}
    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        return out
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if rec.get("kind") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.1):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
