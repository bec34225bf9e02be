"""Tables, plots and the verdict of a study, from its runs' results.

A run's ``eval`` is the results list its trainer wrote (``eval.json``: the schema of
``megasleep eval``'s results.json, one entry per N); counts are correct scored units over units, the
accuracy ``megasleep eval`` reports. Intervals are Wilson 95% score intervals on those counts. "Pooled"
counts add the seeds of one N together: its interval covers sampling noise of the evaluation set only,
so the per-seed columns are printed beside it to show the spread between training runs, which it does
not cover. Summaries written before the one-scorer schema (``{"N=1": {"by_difficulty": ...}}``, scored
per sample) are read too and marked ``legacy``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from megasleep.atomic import atomic_write
from megasleep.eval.harness import by_passes
from megasleep.eval.scoring import wilson
from megasleep.study.diagnose import diagnostics_section, run_statuses


def _num(s: str):
    try:
        return (0, float(s))
    except ValueError:
        return (1, s)


def _from_legacy(n_key: str, ev: dict) -> dict:
    """A pre-schema evaluation of one N as a harness result (its accuracy was per sample)."""
    buckets = []
    for d, b in sorted((ev.get("by_difficulty") or {}).items(), key=lambda kv: _num(kv[0])):
        k = int(b.get("samples") or 0)
        if k:
            buckets.append({"difficulty": d, "n_samples": k, "n_units": k, "correct": round(b.get("accuracy", 0.0) * k),
                            "accuracy": b.get("accuracy")})
    c, n = sum(b["correct"] for b in buckets), sum(b["n_units"] for b in buckets)
    overall = {"n_samples": n, "n_units": n, "correct": c, "accuracy": c / n} if n else None
    return {"passes": int(n_key.split("=")[1]), "loss": ev.get("loss"), "legacy": True, "buckets": buckets,
            "overall": overall}


def results_of(run: dict) -> dict[int, dict]:
    """``{N: result}`` of a run's evaluation (the results list, or a legacy ``{"N=k": ...}`` dict)."""
    ev = run["eval"]
    if isinstance(ev, dict):
        return {r["passes"]: r for r in (_from_legacy(k, v) for k, v in ev.items())}
    return by_passes(ev)


def counts(res: dict | None, difficulty: str | None = None) -> tuple[int, int]:
    """(correct units, units) of one evaluation (one N): overall, or for one difficulty bucket."""
    if not res:
        return 0, 0
    if difficulty is None:
        b = res.get("overall") or {}
    else:
        b = next((b for b in res.get("buckets") or [] if str(b["difficulty"]) == str(difficulty)), {})
    return int(b.get("correct") or 0), int(b.get("n_units") or 0)


def difficulties(res: dict | None) -> list[str]:
    return [str(b["difficulty"]) for b in (res or {}).get("buckets") or []]


def cell(correct: float, n: int) -> str:
    if not n:
        return "-"
    lo, hi = wilson(correct, n)
    return f"{correct / n:.3f} [{lo:.2f}, {hi:.2f}]"


def own_n(run: dict) -> int:
    """The N a model is scored at in the main table: its training N (the largest N for random N)."""
    if run["passes"]:
        return int(run["passes"])
    return max(results_of(run))


def group(results: list[dict]) -> dict[str, list[dict]]:
    by = defaultdict(list)
    for r in results:
        by[r["label"]].append(r)
    return dict(by)


def pooled(runs: list[dict], n: int, difficulty: str | None = None) -> tuple[float, int]:
    c = t = 0
    for r in runs:
        ci, ti = counts(results_of(r).get(n), difficulty)
        c += ci
        t += ti
    return c, t


def main_table(results: list[dict], seeds: list[int]) -> str:
    """Rows: trained N; columns: each seed and the pooled accuracy, all at the model's own N."""
    head = "| trained | evaluated at | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled |"
    lines = [head, "|---|---|" + "---|" * (len(seeds) + 1)]
    for label, runs in group(results).items():
        n = own_n(runs[0])
        by_seed = {r["seed"]: r for r in runs}
        cells = [cell(*counts(results_of(by_seed[s]).get(n))) if s in by_seed else "-" for s in seeds]
        lines.append(f"| {label} | N={n} | " + " | ".join(cells) + f" | {cell(*pooled(runs, n))} |")
    return "\n".join(lines)


def difficulty_table(results: list[dict], name: str) -> str:
    """Rows: trained N (seeds pooled, at its own N); columns: difficulty."""
    diffs = sorted({d for r in results for ev in results_of(r).values() for d in difficulties(ev)}, key=_num)
    lines = ["| trained | evaluated at | " + " | ".join(f"{name}={d}" for d in diffs) + " |",
             "|---|---|" + "---|" * len(diffs)]
    for label, runs in group(results).items():
        n = own_n(runs[0])
        lines.append(f"| {label} | N={n} | " + " | ".join(cell(*pooled(runs, n, d)) for d in diffs) + " |")
    return "\n".join(lines)


def cross_table(results: list[dict]) -> str:
    """Rows: trained N (seeds pooled); columns: N at evaluation."""
    ns = sorted({n for r in results for n in results_of(r)})
    lines = ["| trained | " + " | ".join(f"eval N={n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for label, runs in group(results).items():
        lines.append(f"| {label} | " + " | ".join(cell(*pooled(runs, n)) for n in ns) + " |")
    return "\n".join(lines)


def cost_table(results: list[dict]) -> str:
    lines = ["| run | steps | tokens seen | wall time | tokens/s | final train loss |", "|---|---|---|---|---|---|"]
    for r in results:
        toks = f"{r['tokens_seen']:,}" if r.get("tokens_seen") is not None else "-"
        lines.append(f"| {r['name']} | {r['steps']} | {toks} | {r['seconds'] / 60:.1f} min | "
                     f"{r['tokens_per_s']:,.0f} | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def verdict(results: list[dict], chance: float) -> list[str]:
    """One sentence per trained N against N=1, decided by the pooled intervals (and said as such).

    Runs whose collapse status (:mod:`megasleep.study.diagnose`) is ``collapsed`` are not counted: their
    sleep passes' features converged to one direction, an optimisation failure rather than a measurement
    of what sleep can do. Each line names the runs it left out."""
    groups = group(results)
    base = groups.get("N=1")
    out = []
    if base is None:
        return ["(no N=1 model in this study: no comparison against the awake-only baseline)"]
    collapsed = {name for name, status in run_statuses(results).items() if status == "collapsed"}
    c1, t1 = pooled(base, 1)
    lo1, hi1 = wilson(c1, t1)
    for label, all_runs in groups.items():
        runs = [r for r in all_runs if r["name"] not in collapsed]
        left_out = [r["name"] for r in all_runs if r["name"] in collapsed]
        skipped = (f"collapsed run(s) not counted as evidence about sleep: {', '.join(left_out)}"
                   if left_out else "")
        if not runs:
            out.append(f"{label}: every run collapsed, no verdict ({skipped}).")
            continue
        n = own_n(runs[0])
        c, t = pooled(runs, n)
        lo, hi = wilson(c, t)
        if label != "N=1":
            if lo > hi1:
                rel = "above N=1 beyond the intervals"
            elif hi < lo1:
                rel = "below N=1 beyond the intervals"
            else:
                rel = "not separable from N=1 (intervals overlap)"
            seeds_above = sum(_rate(*counts(results_of(r).get(n))) > hi1 for r in runs)
            rel += f"; {seeds_above} of {len(runs)} seed(s) individually above N=1's interval"
        else:
            rel = "baseline"
        lo_c = "above chance" if lo > chance else "not above chance"
        out.append(f"{label} at N={n}: {c / max(t, 1):.3f} [{lo:.3f}, {hi:.3f}] — {rel}; {lo_c} "
                   f"(chance {chance:g})" + (f"; {skipped}." if skipped else "."))
    return out


def load_reference(path) -> list[dict]:
    """The runs of a study's ``summary.json`` (e.g. the committed one), for :func:`compare`."""
    path = Path(path)
    try:
        runs = json.loads(path.read_text())["runs"]
    except FileNotFoundError:
        raise FileNotFoundError(f"reference results {path}: no such file (a study's summary.json, e.g. "
                                "docs/results/rule110-cpu/summary.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"reference results {path}: not a study summary.json ({type(e).__name__}: {e})") from None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "name" in r and "eval" in r for r in runs):
        raise ValueError(f"reference results {path}: 'runs' must be a list of runs with 'name' and 'eval'")
    return runs


def compare(reference: list[dict], results: list[dict]) -> tuple[str, bool]:
    """Does a rerun reproduce a reference table? One row per (run, eval N) present in both.

    A cell reproduces when the rerun's accuracy lies inside the reference's Wilson 95% interval (the
    acceptance rule of the results pages); "identical" when the correct counts are equal too. Returns the
    markdown table and whether every compared cell reproduced (False when nothing could be compared).
    """
    ref = {r["name"]: r for r in reference}
    lines = ["| run | eval N | reference | rerun | reproduced |", "|---|---|---|---|---|"]
    compared = failed = 0
    for r in results:
        old = ref.get(r["name"])
        if old is None:
            lines.append(f"| {r['name']} | - | (not in the reference) | - | new run |")
            continue
        ref_res, new_res = results_of(old), results_of(r)
        for n in sorted(set(ref_res) & set(new_res)):
            (c0, t0), (c1, t1) = counts(ref_res[n]), counts(new_res[n])
            lo, hi = wilson(c0, t0)
            if ref_res[n].get("legacy") and (new_res[n].get("overall") or {}).get("n_samples") != t1:
                lines.append(f"| {r['name']} | N={n} | {cell(c0, t0)} (per sample) | {cell(c1, t1)} (per unit) | "
                             "not comparable: the reference scored whole samples |")
                continue
            if (c0, t0) == (c1, t1):
                status = "identical"
            elif t1 and lo <= _rate(c1, t1) <= hi:
                status = "within the interval"
            else:
                status = "**no**: outside the reference interval"
                failed += 1
            compared += 1
            lines.append(f"| {r['name']} | N={n} | {cell(c0, t0)} | {cell(c1, t1)} | {status} |")
    rerun = {r["name"] for r in results}
    lines += [f"| {name} | - | in the reference | (not rerun) | - |" for name in ref if name not in rerun]
    ok = compared > 0 and failed == 0
    lines += ["", f"{compared - failed} of {compared} (run, N) cells reproduced the reference within its 95% interval"
              + ("." if compared else " (nothing to compare: no run of the reference was rerun).")]
    return "\n".join(lines), ok


def _rate(correct: float, n: int) -> float:
    return correct / n if n else 0.0


def errorbar(ax, points: list[tuple[float, tuple[float, int]]], color, label: str) -> None:
    """Accuracy points ``(x, (correct, n))`` with their Wilson intervals as error bars."""
    points = [(x, c, n) for x, (c, n) in points if n]
    ys = [c / n for _, c, n in points]
    bounds = [wilson(c, n) for _, c, n in points]
    err = [[y - lo for y, (lo, _) in zip(ys, bounds)], [hi - y for y, (_, hi) in zip(ys, bounds)]]
    ax.errorbar([x for x, _, _ in points], ys, yerr=err, marker="o", capsize=3, color=color, label=label)


def plot(results: list[dict], path: Path, *, chance: float, name: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    groups = group(results)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        for j, r in enumerate(runs):
            if r["curve"]:
                steps, loss = zip(*r["curve"])
                axes[0].plot(steps, loss, color=color, alpha=0.8, ls="-" if j == 0 else "--",
                             label=f"{label} seed {r['seed']}")
        ns = sorted({n for r in runs for n in results_of(r)})
        errorbar(axes[1], [(n, pooled(runs, n)) for n in ns], color, f"trained {label}")
        n = own_n(runs[0])
        diffs = sorted({d for r in runs for d in difficulties(results_of(r).get(n))}, key=_num)
        errorbar(axes[2], [(float(d), pooled(runs, n, d)) for d in diffs], color, f"{label} at N={n}")
    axes[0].set(title="training loss (answer tokens)", xlabel="step", ylabel="cross-entropy")
    axes[1].set(title="exact match vs N at evaluation (seeds pooled, 95% CI)", xlabel="N at evaluation",
                ylabel="accuracy")
    axes[2].set(title=f"exact match vs {name} (own N, seeds pooled, 95% CI)", xlabel=name, ylabel="accuracy")
    finish_figure(fig, axes, path, chance=chance, title=title, integer_x=(0, 1, 2))


def finish_figure(fig, axes, path: Path, *, chance: float, title: str, dpi: int = 100,
                  integer_x: tuple[int, ...] = ()) -> None:
    """The common ending of the accuracy figures (study and demo): panels after the first are
    accuracies, so they get the chance line and a 0..1 range; the panels ``integer_x`` (N, t, ...) get
    integer ticks only; then legends, title, save."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    for i in integer_x:
        axes[i].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1:]:
        ax.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:g})")
        ax.set_ylim(0, 1.02)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_report(cfg, results: list[dict], directory: Path, *, command: str, hardware: str,
                 wall_seconds: float | None) -> Path:
    """``results.md`` (tables + verdict), ``summary.json`` (everything but the loss curves), ``accuracy.png``."""
    directory.mkdir(parents=True, exist_ok=True)
    png = directory / "accuracy.png"
    plot(results, png, chance=cfg.chance, name=cfg.difficulty_name, title=f"megasleep study {cfg.name}")
    train_minutes = sum(r["seconds"] for r in results) / 60
    lines = [
        f"# Study `{cfg.name}`: generated tables", "",
        cfg.description.strip(), "",
        f"- command: `{command}`",
        f"- hardware: {hardware}",
        (f"- wall time of this invocation: {wall_seconds / 60:.1f} min; " if wall_seconds is not None else
         "- tables rewritten from finished runs (`--report-only`); ") +
        f"training time summed over runs: {train_minutes:.1f} min (each run's wall time, which grows when "
        "runs share the cores)",
        f"- base experiment: `{cfg.experiment}` with `{' '.join(cfg.overrides)}`",
        f"- evaluation: {cfg.eval_samples} validation samples per (model, N); exact match; chance {cfg.chance:g}; "
        "[95% Wilson interval]", "",
        "## Accuracy at the model's own N", "", main_table(results, cfg.seeds), "",
        "## Verdict (pooled over seeds; computed, not written by hand)", "",
        *[f"- {v}" for v in verdict(results, cfg.chance)], "",
        f"## Accuracy by {cfg.difficulty_name} (own N, seeds pooled)", "",
        difficulty_table(results, cfg.difficulty_name), "",
        "## Every model at every N (seeds pooled)", "", cross_table(results), "",
        *diagnostics_section(results),
        "## Cost", "", cost_table(results), "",
        f"![accuracy]({png.name})", ""]
    md = directory / "results.md"
    atomic_write(md, "\n".join(lines))
    summary = {"study": cfg.model_dump(), "command": command, "hardware": hardware,
               "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1),
               "runs": [{k: v for k, v in r.items() if k not in ("curve", "config")} for r in results]}
    atomic_write(directory / "summary.json", json.dumps(summary, indent=1) + "\n")
    return md
