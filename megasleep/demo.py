"""`megasleep demo` (what `make demo` runs): the whole pipeline, small enough for a 2-core CPU.

1. build Rule-110 WebDataset shards (train / val, seeded, with their sentencepiece tokenizer);
2. train the tiny AGAG model with DeepSpeed (ZeRO-1, 2 CPU ranks over gloo) twice, on identical data
   and for the same number of steps (equal tokens, so the table compares like with like): once awake
   only (N = 1) and once sleeping (N = 2 passes over every window before eviction), with a progress
   bar and ETA per run;
3. evaluate both at N = 1, 2, 4 with the scorer of ``megasleep eval`` (exact match of the label, Wilson
   95% intervals, per rollout depth t);
4. print the accuracy table and write a plot and a summary into the output directory.

Everything lands in ``runs/demo/`` (``--out``). A rerun starts the training runs afresh (the shards
are reused). ``--quick`` is a ~2-minute smoke version of the same pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

from megasleep.renamed_options import refuse_renamed
from megasleep.train.config import DEFAULT_EXPERIMENT

# The demo task (configs/experiments/tiny-demo.yaml): Rule 110 (docs/tasks.md) scaled down for a CPU — one
# 24-bit string per sequence, L = 24 (the string sits alone in its window and is evicted before the
# query), label = bit 0 after t Rule-110 steps, t in {0, 1, 2, 3}; chance 1/2. t = 0 only asks the model
# to carry one bit across the eviction in its fast weights; every step of t adds a layer of Rule-110
# computation over a wider neighbourhood. (The paper: 4 strings, t = 32, ~5B tokens; here ~1M.)
# t is not marked in the input, so on mixed t the model can only learn answers that agree across depths
# (the demo shows the pipeline, not a depth result); the CPU study of sleep vs depth trains one t:
# configs/studies/rule110-cpu.yaml, docs/results/rule110-cpu.md.
TASK_PARAMS = {"n_strings": 1, "width": 24}
STEPS_FULL = 600  # per N: N=1 and N=2 take 4.4-9.2 min together on the 2-core dev VM (docs/training.md)
DIFFICULTY = "0-3"
CHANCE = 0.5
FULL = dict(train_samples=40_000, val_samples=512, steps=STEPS_FULL, batch=64, budget_minutes=None)
QUICK = dict(train_samples=2_000, val_samples=96, steps=12, batch=16, budget_minutes=None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--train-passes", default="1,2", help="sleep depths N to train, one model each (default: 1,2)")
    refuse_renamed(p, "--passes", "--train-passes", "the list of N to train")
    p.add_argument("--eval-passes", default="1,2,4", help="sleep depths N to evaluate every model at")
    p.add_argument("--ranks", type=int, default=None, help="CPU ranks per training run (default: min(2, cores))")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (same for every N)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="optional wall-time cap per training run (default: none). A capped run may end with fewer "
                        "steps than the others; the summary then says the token counts differ")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run of the same pipeline")
    p.add_argument("overrides", nargs="*", default=[], help="extra experiment overrides (key=value)")


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def build_shards(out: Path, n_train: int, n_val: int) -> Path:
    """Rule-110 shards under out/data (reused when a previous demo built the same ones)."""
    from megasleep.data.manifest import FORMAT_VERSION
    from megasleep.data.shards import build_task_dataset
    from megasleep.data.tasks import get_task

    data = out / "data"
    # the shard format is part of the stamp: older demo shards still load, but are rebuilt in the
    # current (faster) format
    want = {"task": "rule110", "params": TASK_PARAMS, "difficulty": DIFFICULTY, "train": n_train, "val": n_val,
            "seed": 0, "format_version": FORMAT_VERSION}
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
    from megasleep.train.config import load_experiment

    run_dir = out / f"train-N{n}"
    overrides = [
        "data.source=shards", f"data.train={data / 'train'}", f"data.val={data / 'val'}",
        "data.loader.num_workers=0", "data.loader.shuffle_buffer=200",
        f"sleep.passes={n}", f"train.steps={settings['steps']}", f"train.global_batch_size={settings['batch']}",
        f"optim.warmup_steps={min(20, settings['steps'] // 4)}",
        f"train.micro_batch_size={settings['batch'] // ranks}", f"train.log_every={max(1, settings['steps'] // 50)}",
        *([f"train.time_budget_minutes={settings['budget_minutes']}"] if settings["budget_minutes"] else []),
        "checkpoint.every=0",
        f"eval.eval_passes=[{','.join(map(str, eval_passes))}]", f"eval.samples={settings['val_samples']}",
        f"eval.batch_size={max(1, settings['val_samples'] // (3 * ranks))}", "logging.tensorboard=true", *extra]
    config = load_experiment(DEFAULT_EXPERIMENT, overrides)
    # one thread per rank unless told otherwise: more threads than free cores make OpenMP spin-wait
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 2) // ranks))
    _log(f"training N={n}: {ranks} rank(s), {settings['steps']} steps of {settings['batch']} sequences "
         f"(log: {run_dir / 'train.log'})")
    with _progress(run_dir / "metrics.jsonl", settings["steps"], f"train N={n}"):
        res = run_training(config, run_dir, ranks=ranks, threads=threads, prefix=f"  [N={n}]", echo=False)
    return {"passes": n, **res}


@contextlib.contextmanager
def _progress(metrics: Path, total: int, desc: str, poll: float = 1.0):
    """A tqdm bar (steps done, rate, ETA) following the run's ``metrics.jsonl`` while it trains."""
    from tqdm import tqdm

    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)

    def follow():
        seen = 0
        while not stop.wait(poll):
            try:
                lines = metrics.read_text().splitlines()
            except OSError:
                continue
            steps = [json.loads(x)["step"] for x in lines if '"kind": "train"' in x]
            if steps and steps[-1] > seen:
                bar.update(steps[-1] - seen)
                seen = steps[-1]

    th = threading.Thread(target=follow, daemon=True)
    th.start()
    try:
        yield bar
    finally:
        stop.set()
        th.join(timeout=5)
        bar.close()


def table(results: list[dict]) -> str:
    """Rows: trained model x rollout depth t (and all); columns: N at evaluation; accuracy [Wilson 95%]."""
    from megasleep.study.report import cell, counts, difficulties, results_of

    ns = sorted({n for r in results for n in results_of(r)})
    lines = ["| model | t | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    for r in results:
        res = results_of(r)
        diffs = sorted({d for v in res.values() for d in difficulties(v)}, key=float)
        for d in [*diffs, None]:
            cells = [cell(*counts(res.get(n), d)) for n in ns]
            lines.append(f"| trained N={r['passes']} | {'all' if d is None else d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megasleep.study.report import counts, difficulties, errorbar, finish_figure, results_of

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(results):
        color = colors[i % len(colors)]  # one colour per trained model in every panel
        steps, loss = zip(*r["curve"]) if r["curve"] else ((), ())
        axes[0].plot(steps, loss, color=color, label=f"trained N={r['passes']}")
        res = results_of(r)
        errorbar(axes[1], [(n, counts(res[n])) for n in sorted(res)], color, f"trained N={r['passes']}")
        own = res.get(r["passes"])
        errorbar(axes[2], [(float(d), counts(own, d)) for d in sorted(difficulties(own), key=float)], color,
                 f"trained & evaluated at N={r['passes']}")
    axes[0].set(title="training loss (answer tokens)", xlabel="step", ylabel="cross-entropy (log scale)")
    axes[0].set_yscale("log")
    axes[1].set(title="exact match vs sleep depth at evaluation (95% CI)", xlabel="N at evaluation",
                ylabel="accuracy")
    axes[2].set(title="exact match vs rollout depth t (95% CI)", xlabel="Rule-110 steps t", ylabel="accuracy")
    finish_figure(fig, axes, path, chance=CHANCE, dpi=110, integer_x=(0, 1, 2),
                  title="megasleep demo: tiny AGAG model on Rule 110 (1 string, L=24, hard eviction), CPU, "
                        "DeepSpeed ZeRO-1, equal steps per N")


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
    passes = [int(x) for x in str(args.train_passes).split(",") if x]
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
             f"Exact-match accuracy of the Rule-110 label [Wilson 95% interval] (chance {CHANCE:g}); rows: "
             "trained model and rollout depth t, columns: sleep depth N at evaluation. Every model trained "
             f"{settings['steps']} steps of {settings['batch']} sequences.", "", tab, ""]
    for r in results:
        lines.append(f"- trained N={r['passes']}: {r['steps']} steps, {r['tokens_seen']:,} tokens in {r['seconds']:.0f}s"
                     f"{' (time budget reached)' if r['ended_early'] else ''}, final train loss "
                     f"{r['final_loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s")
    if len({r["tokens_seen"] for r in results}) > 1:
        lines.append("- **the runs saw different token counts** (a time budget cut one short): the table does not "
                     "compare like with like")
    lines.append(f"- plot: {png}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print()
    print("\n".join(lines))
    return 0
