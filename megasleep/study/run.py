"""Run a study: every (N, seed) through the real trainer, in parallel processes, resumable.

A finished run leaves ``result.json`` in its run directory together with the config it was trained
with; rerunning the study reuses it when that config matches the run's config now (the study's or the
base experiment's settings alike), so a study cut off half-way (a session
limit, a preempted job) continues where it stopped, and changing a setting retrains what it changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from megasleep.atomic import atomic_write
from megasleep.study.config import edit
from megasleep.train.config import REPO_ROOT, ExperimentConfig, dump_yaml

NOISE = ("FutureWarning", "return func(", "warnings.warn")


def _log(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


def _stream(proc: subprocess.Popen, prefix: str, sink, echo: bool) -> None:
    for line in proc.stdout:
        sink.write(line)
        sink.flush()
        if echo and not line.startswith("[2") and not any(n in line for n in NOISE):
            print(f"{prefix} {line}", end="", flush=True)


def run_training(config: ExperimentConfig, run_dir: Path, *, ranks: int = 1, threads: int = 1,
                 prefix: str = "", echo: bool = True) -> dict:
    """Train ``config`` afresh in ``run_dir``: the config (with that run directory, resume off) is written
    to ``run_dir/config.yaml``, then ``megasleep train run_dir/config.yaml`` runs in a subprocess (``ranks``
    CPU processes through torchrun), logged to ``run_dir/train.log``. Returns what the run measured:
    steps, tokens seen, wall time, tokens/s, final loss, the loss curve and the evaluation at every N
    (``eval.json``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = edit(config, {"run_dir": str(run_dir), "checkpoint": {"resume": "never"}})
    config_file = run_dir / "config.yaml"
    atomic_write(config_file, dump_yaml(config))
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "megasleep.train.cli", str(config_file)]
    else:
        cmd = [sys.executable, "-m", "megasleep.train.cli", str(config_file)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.time()
    with open(run_dir / "train.log", "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        th = threading.Thread(target=_stream, args=(proc, prefix, sink, echo), daemon=True)
        th.start()
        rc = proc.wait()
        th.join(timeout=10)
    seconds = time.time() - t0
    if rc != 0:
        raise RuntimeError(f"training failed (exit {rc}); see {run_dir / 'train.log'}")
    status = json.loads((run_dir / "status.json").read_text())
    ev = json.loads((run_dir / "eval.json").read_text())
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r.get("kind") == "train"]
    tps = [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    return {"run_dir": str(run_dir), "seconds": round(seconds, 1), "steps": status["step"],
            "ended_early": status.get("ended_early", False), "final_loss": status.get("loss"),
            "tokens_seen": train[-1].get("tokens_seen") if train else None,
            "tokens_per_s": sum(tps) / max(len(tps), 1), "eval": ev["results"],
            "curve": [(r["step"], r["loss"]) for r in train]}


def run_study(cfg, runs, *, jobs: int = 1, fresh: bool = False, echo: bool = True) -> list[dict]:
    """Train every run of ``runs`` (``megasleep.study.config.plan``), ``jobs`` at a time."""
    out = cfg.path("out")

    def one(spec) -> dict:
        run_dir = out / spec.dirname
        done = run_dir / "result.json"
        with _claim(out / f".{spec.dirname}.lock", spec.dirname):
            if not fresh and done.is_file():
                prev = json.loads(done.read_text())
                if prev.get("config") == spec.config.resolved():
                    _log(f"{spec.dirname}: reusing the finished run in {run_dir}")
                    return prev
            return train(spec, run_dir, done)

    def train(spec, run_dir: Path, done: Path) -> dict:
        _log(f"{spec.dirname}: training {spec.label}, seed {spec.seed} (log: {run_dir / 'train.log'})")
        res = run_training(spec.config, run_dir, threads=cfg.threads, prefix=f"  [{spec.dirname}]",
                           echo=echo and jobs == 1)
        res.update(label=spec.label, passes=spec.passes, random_n=spec.random_n, seed=spec.seed, name=spec.dirname,
                   edits=spec.edits, config=spec.config.resolved())
        if cfg.diagnostics:
            from megasleep.study.diagnose import diagnose_run

            res["diagnostics"] = diagnose_run(run_dir, cfg.eval_passes, cfg.eval_samples)
        atomic_write(done, json.dumps(res, indent=1))  # a run counts as finished only once its result is complete
        _log(f"{spec.dirname}: {res['steps']} steps in {res['seconds'] / 60:.1f} min, final loss "
             f"{res['final_loss']:.4f}")
        return res

    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(one, runs))


@contextmanager
def _claim(lock: Path, name: str, poll: float = 10.0):
    """Hold ``lock`` (a file holding our pid) while a run is trained. Two invocations of one study (say
    ``--only`` halves on two machines sharing the directory) then never train the same run at once: the
    second waits for the first and reuses its result. A lock whose process is gone is taken over."""
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and not _alive(pid):
                lock.unlink(missing_ok=True)  # its owner died: take it over
                continue
            if not waited:
                _log(f"{name}: being trained by process {pid or '?'}; waiting for it")
                waited = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
