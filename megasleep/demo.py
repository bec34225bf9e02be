"""`megasleep demo` (what `make demo` runs): the whole pipeline, small enough for a 2-core CPU.

1. build Rule-110 WebDataset shards (train / val, seeded, with their sentencepiece tokenizer);
2. train the tiny AGAG model with DeepSpeed (ZeRO-1, 2 CPU ranks over gloo) twice, on identical data:
   once awake only (N = 1) and once sleeping (N = 2 passes over every window before eviction);
3. evaluate both at N = 1, 2, 4 (exact match of the label and answer loss, per rollout depth t);
4. print the accuracy table and write a plot and a summary into the output directory.

Everything lands in ``runs/demo/`` (``--out``). A rerun starts the training runs afresh (the shards
are reused). ``--quick`` is a ~2-minute smoke version of the same pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from megasleep.train.config import DEFAULT_EXPERIMENT

# The demo task (configs/experiments/tiny-demo.yaml): Rule 110 (SPEC §4) scaled down for a CPU — one
# 24-bit string per sequence, L = 24 (the string sits alone in its window and is evicted before the
# query), label = bit 0 after t Rule-110 steps, t in {0, 1, 2, 3}; chance 1/2. t = 0 only asks the model
# to carry one bit across the eviction in its fast weights; every step of t adds a layer of Rule-110
# computation over a wider neighbourhood. (The paper: 4 strings, t = 32, ~5B tokens; here ~1M.)
# t is not marked in the input, so on mixed t the model can only learn answers that agree across depths
# (the demo shows the pipeline, not a depth result); the CPU study of sleep vs depth trains one t:
# configs/studies/rule110-cpu.yaml, docs/results/rule110-cpu.md.
TASK_PARAMS = {"n_strings": 1, "width": 24}
DIFFICULTY = "0-3"
CHANCE = 0.5
FULL = dict(train_samples=40_000, val_samples=512, steps=600, batch=64, budget_minutes=5.0)
QUICK = dict(train_samples=2_000, val_samples=96, steps=12, batch=16, budget_minutes=1.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--passes", default="1,2", help="sleep depths N to train, one model each (default: 1,2)")
    p.add_argument("--eval-passes", default="1,2,4", help="sleep depths N to evaluate every model at")
    p.add_argument("--ranks", type=int, default=None, help="CPU ranks per training run (default: min(2, cores))")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (same for every N)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="wall-time cap per training run: it ends early, then evaluates (default: 5)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run of the same pipeline")
    p.add_argument("overrides", nargs="*", default=[], help="extra experiment overrides (key=value)")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def build_shards(out: Path, n_train: int, n_val: int) -> Path:
    """Rule-110 shards under out/data (reused when a previous demo built the same ones)."""
    from megasleep.data.shards import build_task_dataset
    from megasleep.data.tasks import get_task

    data = out / "data"
    want = {"task": "rule110", "params": TASK_PARAMS, "difficulty": DIFFICULTY, "train": n_train, "val": n_val,
            "seed": 0}
    stamp = data / "demo-data.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        _log(f"reusing shards in {data}")
        return data
    shutil.rmtree(data, ignore_errors=True)
    t0 = time.time()
    tok = get_task("rule110").make_task_tokenizer(data / "tokenizer")
    # one 24-bit string x 4 depths is a space of 2^26 samples: among 40k train samples a val sample
    # repeats one with probability ~6e-4 (~0.3 of 512 expected), so the split-overlap check is off
    build_task_dataset("rule110", data, {"train": n_train, "val": n_val}, 0, DIFFICULTY, tok.path,
                       params=TASK_PARAMS, shard_size=max(100, n_train // 8), workers=1, progress=False,
                       check_disjoint=False)
    stamp.write_text(json.dumps(want))
    _log(f"built {n_train:,} train + {n_val:,} val Rule-110 samples (t in {DIFFICULTY}) in {data} "
         f"({time.time() - t0:.1f}s)")
    return data


def train_one(n: int, data: Path, out: Path, settings: dict, eval_passes: list[int], ranks: int,
              extra: list[str]) -> dict:
    from megasleep.study.run import run_training

    run_dir = out / f"train-N{n}"
    overrides = [
        "data.source=shards", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
        "data.loader.num_workers=0", "data.loader.shuffle_buffer=200",
        f"sleep.passes={n}", f"train.steps={settings['steps']}", f"train.global_batch_size={settings['batch']}",
        f"optim.warmup_steps={min(20, settings['steps'] // 4)}",
        f"train.micro_batch_size={settings['batch'] // ranks}", f"train.log_every={max(1, settings['steps'] // 50)}",
        f"train.time_budget_minutes={settings['budget_minutes']}", "checkpoint.every=0",
        f"eval.passes=[{','.join(map(str, eval_passes))}]", f"eval.samples={settings['val_samples']}",
        f"eval.batch_size={max(1, settings['val_samples'] // (3 * ranks))}", "logging.tensorboard=true", *extra]
    # one thread per rank unless told otherwise: more threads than free cores make OpenMP spin-wait
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) // ranks))
    _log(f"training N={n}: {ranks} rank(s), {settings['steps']} steps of {settings['batch']} sequences "
         f"(log: {run_dir / 'train.log'})")
    res = run_training(DEFAULT_EXPERIMENT, overrides, run_dir, ranks=ranks, threads=threads, prefix=f"  [N={n}]")
    return {"passes": n, **res}


def table(results: list[dict]) -> str:
    from megasleep.train.evaluate import format_table

    return format_table({f"trained N={r['passes']}": r["eval"] for r in results}, "accuracy")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megasleep.study.report import finish_figure
    from megasleep.train.evaluate import passes_of

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        steps, loss = zip(*r["curve"]) if r["curve"] else ((), ())
        axes[0].plot(steps, loss, label=f"trained N={r['passes']}")
        ns = sorted(r["eval"], key=passes_of)
        axes[1].plot([passes_of(k) for k in ns], [r["eval"][k].get("accuracy", float("nan")) for k in ns],
                     marker="o", label=f"trained N={r['passes']}")
        own = r["eval"].get(f"N={r['passes']}", {}).get("by_difficulty", {})
        diffs = sorted(own, key=float)
        axes[2].plot([float(d) for d in diffs], [own[d].get("accuracy", float("nan")) for d in diffs], marker="o",
                     label=f"trained & evaluated at N={r['passes']}")
    axes[0].set(title="training loss (answer tokens)", xlabel="step", ylabel="cross-entropy (log scale)")
    axes[0].set_yscale("log")
    axes[1].set(title="exact match vs sleep depth at evaluation", xlabel="N at evaluation", ylabel="accuracy")
    axes[2].set(title="exact match vs rollout depth t", xlabel="Rule-110 steps t", ylabel="accuracy")
    axes[1].set_xticks(sorted({passes_of(k) for r in results for k in r["eval"]}))
    axes[2].set_xticks(sorted({float(d) for r in results for v in r["eval"].values() for d in v["by_difficulty"]}))
    finish_figure(fig, axes, path, chance=CHANCE, dpi=110, title="megasleep demo: tiny AGAG model on Rule 110 "
                  "(1 string, L=24, hard eviction), CPU, DeepSpeed ZeRO-1")


def main(args) -> int:
    t0 = time.time()
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(QUICK if args.quick else FULL)
    if args.steps:
        settings["steps"] = args.steps
    if args.budget_minutes:
        settings["budget_minutes"] = args.budget_minutes
    passes = [int(x) for x in str(args.passes).split(",") if x]
    eval_passes = [int(x) for x in str(args.eval_passes).split(",") if x]
    ranks = args.ranks or max(1, min(2, os.cpu_count() or 1))
    if settings["batch"] % ranks:
        raise ValueError(f"--ranks {ranks} must divide the batch size {settings['batch']}")
    _log(f"output: {out}  (train N in {passes}, evaluate at N in {eval_passes}, {ranks} CPU rank(s) per run)")
    data = build_shards(out, settings["train_samples"], settings["val_samples"])
    results = [train_one(n, data, out, settings, eval_passes, ranks, list(args.overrides)) for n in passes]
    png = out / "demo.png"
    plot(results, png)
    tab = table(results)
    total = time.time() - t0
    summary = {"seconds": round(total, 1), "task": {"name": "rule110", **TASK_PARAMS, "t": DIFFICULTY},
               "settings": settings, "ranks": ranks, "runs": [{k: v for k, v in r.items() if k != "curve"}
                                                               for r in results], "plot": str(png)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# megasleep demo ({time.strftime('%Y-%m-%d %H:%M')}, {total / 60:.1f} min)", "",
             f"Exact-match accuracy of the Rule-110 label (chance {CHANCE:g}); rows: trained model and rollout "
             "depth t, columns: sleep depth N at evaluation.", "", tab, ""]
    for r in results:
        lines.append(f"- trained N={r['passes']}: {r['steps']} steps in {r['seconds']:.0f}s"
                     f"{' (time budget reached)' if r['ended_early'] else ''}, final train loss "
                     f"{r['final_loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s")
    lines.append(f"- plot: {png}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))
    return 0
