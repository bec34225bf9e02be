"""`megasleep study CONFIG`: train every (N, seed) of a study, evaluate each at every N, write the tables.

    megasleep study configs/studies/rule110-cpu.yaml --jobs 2
    megasleep study configs/studies/rule110-cpu.yaml --only N1-seed0 N2-seed0   # a subset
    megasleep study configs/studies/rule110-cpu.yaml --report-only               # tables from finished runs
    megasleep study configs/studies/rule110-cpu.yaml --compare committed.json    # check a rerun against a table

Finished runs are reused (see megasleep.study.run), so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from megasleep.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="study YAML (configs/studies/*.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="study overrides (key=value), e.g. seeds=[0]")
    p.add_argument("--jobs", type=int, default=None,
                   help="training runs at a time (default: cores // threads per run)")
    p.add_argument("--only", nargs="+", default=None, metavar="RUN", help="run only these (e.g. N2-seed1)")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--report-only", action="store_true", help="write the tables from finished runs only")
    p.add_argument("--results", default=None, help="where to write the tables (default: the study's results)")
    p.add_argument("--compare", default=None, metavar="SUMMARY_JSON",
                   help="check the runs against a reference summary.json (read before the study writes its own): "
                        "every (run, N) must fall in the reference's 95%% interval, else exit 1")


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU used; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main(args) -> int:
    from megasleep.study.config import load_study, plan
    from megasleep.study.report import compare, load_reference, write_report
    from megasleep.study.run import run_study

    t0 = time.time()
    cfg = load_study(args.config, args.overrides)
    # read the reference first: by default the study rewrites the very file it may be compared against
    reference = None if args.compare is None else load_reference(args.compare)
    runs = plan(cfg, args.config)  # every run's config, validated before anything trains
    if args.only:
        unknown = sorted(set(args.only) - {r.dirname for r in runs})
        if unknown:
            raise ConfigError(f"{args.config}: --only {' '.join(unknown)}: no such run (the study has "
                              f"{', '.join(r.dirname for r in runs)})")
        runs = [r for r in runs if r.dirname in args.only]
    if args.report_only:
        results = []
        for spec in runs:
            done = cfg.path("out") / spec.dirname / "result.json"
            if done.is_file():
                results.append(json.loads(done.read_text()))
            else:
                print(f"[study] {spec.dirname}: not finished ({done} missing), left out", file=sys.stderr)
        if not results:
            raise FileNotFoundError(f"no finished run of study {cfg.name} under {cfg.path('out')}")
    else:
        jobs = args.jobs or max(1, (os.cpu_count() or 1) // cfg.threads)
        print(f"[study] {cfg.name}: {len(runs)} run(s), {jobs} at a time, {cfg.threads} thread(s) each; "
              f"runs in {cfg.path('out')}", flush=True)
        results = run_study(cfg, runs, jobs=jobs, fresh=args.fresh)
    directory = cfg.path("results") if args.results is None else args.results
    command = "megasleep study " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    md = write_report(cfg, results, Path(directory), command=command, hardware=hardware(),
                      wall_seconds=None if args.report_only else time.time() - t0)
    print(md.read_text())
    print(f"[study] tables: {md}")
    if reference is not None:
        table, ok = compare(reference, results)
        (md.parent / "reproduction.md").write_text(
            f"# Study `{cfg.name}`: rerun against {args.compare}\n\n- command: `{command}`\n"
            f"- hardware: {hardware()}\n\n{table}\n")
        print(f"\n[study] reproduction check against {args.compare}:\n{table}")
        return 0 if ok else 1
    return 0
