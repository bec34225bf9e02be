"""Collapse diagnostics of finished training runs (megasleep/sleep/diagnostics.py), at several N.

    python -m megasleep.study.diagnose runs/studies/pointer-cpu/N3-seed0 [more run dirs] --eval-passes 1 2 3 4

A run directory is what ``megasleep train`` leaves: ``config.yaml`` (the resolved experiment) and
``export/`` (the final weights; ``checkpoint.export=true``). The diagnostics are measured on the run's
own validation samples (task data: the samples its end-of-training evaluation used) and written to
``RUN_DIR/diagnostics.json`` (atomically); the table printed labels each model's collapse status, with
the N = 1 model of the same seed (a sibling directory ``N1-seed<s>``) as the awake reference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

from megasleep.atomic import atomic_write
from megasleep.renamed_options import refuse_renamed
from megasleep.sleep.diagnostics import collapse_diagnostics, collapse_status, diagnostics_table

DIAG_FILE = "diagnostics.json"


def diagnose_run(run_dir: str | Path, eval_passes: list[int], samples: int | None = None,
                 batch_size: int = 256) -> dict[str, dict[str, float]]:
    """``{"N=1": diagnostics, ...}`` of the run's exported model; also written to RUN_DIR/diagnostics.json."""
    from megasleep.checkpoint.load import load_pretrained
    from megasleep.data.tokenizer import load_tokenizer
    from megasleep.train.config import load_experiment
    from megasleep.train.data import as_batch, collate, task_eval_samples

    run_dir = Path(run_dir)
    for need in ("config.yaml", "export/config.json"):
        if not (run_dir / need).is_file():
            raise FileNotFoundError(f"{run_dir}: no {need} (diagnostics need a finished run trained with "
                                    "checkpoint.export=true)")
    cfg = load_experiment(run_dir / "config.yaml")
    task = cfg.data.task
    if cfg.data.source != "task" or task is None:
        raise ValueError(f"{run_dir}: diagnostics of a run need task data (data.source=task), got {cfg.data.source!r}")
    tok = load_tokenizer(run_dir / "export" / "tokenizer.model")
    model = load_pretrained(run_dir / "export", device="cpu", dtype=torch.float32)
    items = task_eval_samples(task.name, tok, seed=task.seed, difficulty=task.eval_difficulty or task.difficulty,
                              params=task.params, n=samples or cfg.eval.samples)
    batches = [as_batch(collate(items[i:i + batch_size], tok.pad_id)) for i in range(0, len(items), batch_size)]
    out = {f"N={n}": collapse_diagnostics(model, batches, cfg.sleep.model_copy(update={"passes": n}), tok.pad_id)
           for n in eval_passes}
    atomic_write(run_dir / DIAG_FILE, json.dumps({"eval_passes": eval_passes, "samples": len(items), "diagnostics": out},
                                                 indent=1))
    return out


def trained_passes(run_dir: Path) -> int:
    from megasleep.train.config import load_experiment

    return load_experiment(run_dir / "config.yaml").sleep.passes


def status_rows(runs: dict[str, tuple[int, dict[str, dict[str, float]]]]) -> dict[str, tuple[dict, str]]:
    """``name -> (trained N, diagnostics by N)`` -> ``name -> (diagnostics at its own N, status)``, with
    the awake reference of a ``N<n>-seed<s>`` run taken from ``N1-seed<s>`` when that run is present."""
    rows = {}
    for name, (n, diags) in runs.items():
        seed = re.search(r"seed(\d+)$", name)
        ref = runs.get(f"N1-seed{seed.group(1)}") if seed else None
        reference = ref[1].get("N=1") if ref else None
        own = diags.get(f"N={n}", {})
        rows[name] = (own, collapse_status(own, reference))
    return rows


def _n_of(key: str) -> int:
    """The N of a diagnostics key ``"N=4"``."""
    return int(key.split("=")[1])


def run_diagnostics(run: dict) -> dict[str, dict[str, float]]:
    """A study run's diagnostics by N (``{"N=2": {...}}``): measured after training (``run["diagnostics"]``,
    study option ``diagnostics``) or, else, those its training evaluation carried (``eval.diagnostics``)."""
    if run.get("diagnostics"):
        return run["diagnostics"]
    ev = run.get("eval")
    if not isinstance(ev, list):
        return {}
    return {f"N={r['passes']}": r["diagnostics"] for r in ev if isinstance(r, dict) and r.get("diagnostics")}


def diagnosed_runs(results: list[dict]) -> dict[str, tuple[int, dict[str, dict[str, float]]]]:
    """``name -> (trained N, diagnostics by N)`` of the runs that have diagnostics (input of :func:`status_rows`)."""
    out = {}
    for r in results:
        diags = run_diagnostics(r)
        if diags:
            out[r["name"]] = (r["passes"] or max(_n_of(k) for k in diags), diags)
    return out


def run_statuses(results: list[dict]) -> dict[str, str]:
    """``name -> collapse status`` at the run's own N (runs without diagnostics are left out)."""
    return {name: status for name, (_, status) in status_rows(diagnosed_runs(results)).items()}


def diagnostics_section(results: list[dict]) -> list[str]:
    """Lines of a study report (``results.md``): every run's diagnostics at its own N and its collapse
    status, and which runs cannot count as evidence about sleep. Empty when no run was diagnosed."""
    runs = diagnosed_runs(results)
    if not runs:
        return []
    rows = status_rows(runs)
    collapsed = [name for name, (_, status) in rows.items() if status == "collapsed"]
    return ["## Collapse diagnostics (each model at its own N)", "",
            "Memory worth: answer loss with another sample's fast weights minus with its own (nats). Key share: "
            "squared norm of the mean L2-normalised key of the consolidation window, largest over SSM layers, "
            "per core pass (p1 = wake). Status: `collapsed` when the last sleep pass's key share is above "
            "0.9 while the awake reference's (the N = 1 model of the same seed) is below 0.5.", "",
            diagnostics_table(rows), "",
            (f"- **Collapsed runs, not evidence about sleep:** {', '.join(collapsed)}" if collapsed
             else "- No run collapsed by this rule."), ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megasleep.study.diagnose", description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", nargs="+", help="finished training runs (config.yaml + export/)")
    p.add_argument("--eval-passes", nargs="+", type=int, default=[1, 2, 3, 4], help="the N to measure at")
    refuse_renamed(p, "--passes", "--eval-passes", "the list of N to measure at")
    p.add_argument("--samples", type=int, default=None, help="validation samples (default: the run's eval.samples)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    runs = {}
    for d in map(Path, args.run_dirs):
        try:
            runs[d.name] = (trained_passes(d), diagnose_run(d, args.eval_passes, args.samples))
        except (FileNotFoundError, ValueError) as exc:
            print(f"[diagnose] {exc}", file=sys.stderr)
            return 2
        print(f"[diagnose] {d}: wrote {d / DIAG_FILE}", flush=True)
    print(diagnostics_table(status_rows(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
