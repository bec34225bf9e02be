"""Results directory: results.json, buckets.csv, windows.csv, samples.jsonl and PNG plots; and the
side-by-side comparison of several results (``megasleep eval compare``).

What: :func:`write_results` writes one evaluation (format ``megasleep-eval``, version 1: provenance of
checkpoint, data and tokenizer, every setting, then one result per N in the schema of
:func:`megasleep.eval.harness.summarize`); the compare functions read any number of them back.
Contract: every reader (studies, ``eval compare``, the demo) reads this one schema; the files are
written atomically. Field by field: docs/evaluation.md (section 1, the results table).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from megasleep.atomic import atomic_path, atomic_write

RESULTS_NAME = "results.json"
BUCKET_FIELDS = ["passes", "difficulty_name", "difficulty", "n_samples", "n_units", "correct", "accuracy", "ci_low",
                 "ci_high", "wilson_low", "wilson_high", "answer_loss", "answer_tokens", "teacher_forced_accuracy"]
WINDOW_FIELDS = ["passes", "window", "tokens", "loss", "ppl", "mean_passes_used"]


def _clean(x):
    """JSON-safe: NaN / inf -> None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def write_results(out_dir: str | os.PathLike, doc: dict, records: list[dict], plots: bool = True) -> dict:
    """Write everything into ``out_dir``; returns the file map (also stored in results.json)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dname = doc["data"].get("difficulty_name", "difficulty")
    bucket_rows, window_rows = [], []
    for res in doc["results"]:
        for b in res.get("buckets") or []:
            bucket_rows.append({"passes": res["passes"], "difficulty_name": dname, **b})
        if res.get("overall"):
            bucket_rows.append({"passes": res["passes"], "difficulty_name": dname, "difficulty": "all", **res["overall"]})
        for w in res.get("windows") or []:
            window_rows.append({"passes": res["passes"], **w})
    files = {"results": RESULTS_NAME, "windows_csv": "windows.csv", "samples": "samples.jsonl"}
    write_csv(out / "windows.csv", WINDOW_FIELDS, window_rows)
    if bucket_rows:
        write_csv(out / "buckets.csv", BUCKET_FIELDS, bucket_rows)
        files["buckets_csv"] = "buckets.csv"
    with atomic_path(out / "samples.jsonl") as tmp, open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(_clean(r), sort_keys=True) + "\n")
    if plots:
        files.update(make_plots(out, doc))
    doc["files"] = files
    atomic_write(out / RESULTS_NAME, json.dumps(_clean(doc), indent=1, sort_keys=False) + "\n")
    return files


def make_plots(out: Path, doc: dict) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    files = {}
    results = doc["results"]
    chance = (doc.get("settings") or {}).get("chance")

    def chance_line(ax):
        if chance is not None:
            ax.axhline(chance, color="gray", ls=":", lw=1, label=f"chance ({chance:.3g})")

    dname = doc["data"].get("difficulty_name", "difficulty")
    title = f"{Path(doc['checkpoint']['path']).name} on {doc['data'].get('task') or doc['data'].get('kind')} " \
            f"(L={doc['settings']['window']}, {doc['settings']['eviction']})"
    Ns = [r["passes"] for r in results]
    diffs = sorted({b["difficulty"] for r in results for b in r.get("buckets") or []}, key=lambda d: (str(type(d)), d))
    if diffs:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        cmap = plt.get_cmap("viridis")
        for k, d in enumerate(diffs):
            pts = [(r["passes"], b) for r in results for b in r["buckets"] if b["difficulty"] == d]
            x = [p[0] for p in pts]
            y = [p[1]["accuracy"] for p in pts]
            lo = [max(0.0, p[1]["accuracy"] - p[1]["ci_low"]) for p in pts]
            hi = [max(0.0, p[1]["ci_high"] - p[1]["accuracy"]) for p in pts]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=cmap(k / max(1, len(diffs) - 1)),
                        label=f"{dname}={d}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ns, [str(n) for n in Ns])
        ax.minorticks_off()  # the log axis' minor ticks would label fractional N
        chance_line(ax)
        ax.set_xlabel("sleep passes N")
        ax.set_ylabel("exact-match accuracy (95% bootstrap CI)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(diffs) > 8 else 1)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_passes.png", dpi=120)
        plt.close(fig)
        files["accuracy_vs_passes"] = "accuracy_vs_passes.png"
        numeric = [d for d in diffs if isinstance(d, (int, float))]
        if len(numeric) > 1:
            fig, ax = plt.subplots(figsize=(6.4, 4.4))
            for r in results:
                bs = [b for b in r["buckets"] if isinstance(b["difficulty"], (int, float))]
                label = f"N={r['passes']}"
                if r.get("gsm"):
                    label += f" (AUC {r['gsm']['auc']:.1f})"
                err = [[max(0.0, b["accuracy"] - b["ci_low"]) for b in bs], [max(0.0, b["ci_high"] - b["accuracy"])
                                                                           for b in bs]]
                ax.errorbar([b["difficulty"] for b in bs], [b["accuracy"] for b in bs], yerr=err, marker="o",
                            capsize=3, label=label)
            if all(float(d).is_integer() for d in numeric):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            chance_line(ax)
            ax.set_xlabel(dname)
            ax.set_ylabel("exact-match accuracy (95% bootstrap CI)")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out / "accuracy_vs_difficulty.png", dpi=120)
            plt.close(fig)
            files["accuracy_vs_difficulty"] = "accuracy_vs_difficulty.png"
    if any(w.get("loss") is not None for r in results for w in r.get("windows") or []):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for r in results:
            ws = [w for w in r["windows"] if w.get("loss") is not None]
            ax.plot([w["window"] for w in ws], [w["loss"] for w in ws], marker="o", label=f"N={r['passes']}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("window index (tokens [iL, (i+1)L))")
        ax.set_ylabel("loss on target tokens (nats/token)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss_vs_window.png", dpi=120)
        plt.close(fig)
        files["loss_vs_window"] = "loss_vs_window.png"
    return files


# ------------------------------------------------------------------------------------------ compare
def read_results(path: str | os.PathLike) -> dict:
    """A results document: ``megasleep eval``'s results.json, or a training run's ``eval.json`` (the
    trainer scores with the same harness, so its ``results`` have the same schema)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_NAME if (p / RESULTS_NAME).is_file() or not (p / "eval.json").is_file() else p / "eval.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {RESULTS_NAME} (expected an evaluation results directory, or a training "
                                "run directory with eval.json)")
    doc = json.loads(p.read_text())
    if p.name == "eval.json" and isinstance(doc.get("results"), list):
        doc = _training_eval(p, doc)
    if doc.get("format") != "megasleep-eval":
        raise ValueError(f"{p}: not a megasleep evaluation result (format={doc.get('format')!r})")
    doc["_path"] = str(p)
    return doc


def _training_eval(path: Path, ev: dict) -> dict:
    """A training run's eval.json as a results document (settings from the run's config.yaml)."""
    import yaml

    cfg_file = path.parent / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    sleep = (cfg or {}).get("sleep") or {}
    data = (cfg or {}).get("data") or {}
    task = (data.get("task") or {}).get("name") if data.get("source") == "task" else None
    return {"format": "megasleep-eval", "results": ev["results"],
            "checkpoint": {"path": f"{path.parent} (training run, step {ev.get('step')})"},
            "data": {"task": task, "kind": "task" if task else data.get("source"),
                     "n_examples": (ev["results"][0]["n_examples"] if ev["results"] else None)},
            "settings": {"window": sleep.get("window"), "eviction": sleep.get("eviction")}}


def _fmt_acc(b: dict | None) -> str:
    if not b or b.get("accuracy") is None:
        return "-"
    lo, hi = b.get("ci_low"), b.get("ci_high")
    ci = f" [{lo:.3f},{hi:.3f}]" if lo is not None and hi is not None else ""
    return f"{b['accuracy']:.3f}{ci}"


def _fmt_num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def compare_rows(docs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """A table: one row per (N, metric, difficulty / window), one column per result."""
    header = ["N", "metric", "key"] + [f"[{i + 1}]" for i in range(len(docs))]
    rows: list[list[str]] = []
    by_n = [{r["passes"]: r for r in d["results"]} for d in docs]
    Ns = sorted({n for m in by_n for n in m})
    for n in Ns:
        res = [m.get(n) for m in by_n]
        if any(r and r.get("overall") for r in res):
            rows.append([str(n), "accuracy", "all"] + [_fmt_acc(r.get("overall") if r else None) for r in res])
            diffs = sorted({b["difficulty"] for r in res if r for b in r.get("buckets") or []}, key=lambda d: (str(type(d)), d))
            for d in diffs:
                cells = []
                for r in res:
                    b = next((b for b in (r or {}).get("buckets") or [] if b["difficulty"] == d), None)
                    cells.append(_fmt_acc(b))
                rows.append([str(n), "accuracy", str(d)] + cells)
            if any(r and r.get("gsm") for r in res):
                rows.append([str(n), "gsm_auc", "ops"] + ["-" if not (r and r.get("gsm")) else f"{r['gsm']['auc']:.2f}"
                                                           for r in res])
        wins = sorted({w["window"] for r in res if r for w in r.get("windows") or [] if w.get("loss") is not None})
        if any(r and r.get("loss") is not None for r in res):
            rows.append([str(n), "loss", "all"] + [_fmt_num(r.get("loss") if r else None) for r in res])
        for w in wins:
            cells = []
            for r in res:
                x = next((x for x in (r or {}).get("windows") or [] if x["window"] == w), None)
                cells.append(_fmt_num(x.get("loss") if x else None))
            rows.append([str(n), "window_loss", str(w)] + cells)
        if any(r and r.get("adaptive") for r in res):
            rows.append([str(n), "mean_passes_used", "all"] + [
                "-" if not (r and r.get("adaptive")) else _fmt_num(r["adaptive"].get("mean_passes_used")) for r in res])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def compare(paths: list[str], csv_path: str | None = None) -> str:
    docs = [read_results(p) for p in paths]
    legend = []
    for i, d in enumerate(docs):
        s = d["settings"]
        legend.append(f"[{i + 1}] {d['_path']}: checkpoint {d['checkpoint']['path']}, data "
                      f"{d['data'].get('task') or d['data'].get('kind')} ({d['data'].get('n_examples')} examples), "
                      f"L={s['window']} {s['eviction']}" + (f", adaptive tol {s['adaptive_tol']}" if s.get("adaptive_tol") else ""))
    header, rows = compare_rows(docs)
    text = "\n".join(legend) + "\n\n" + format_table(header, rows)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return text


__all__ = ["compare", "compare_rows", "format_table", "make_plots", "read_results", "write_results"]
