"""In-training evaluation at several sleep depths N (Huginn's habit: depth curves on every eval).

For every N: mean target loss, loss per window index, and — for task data whose samples carry
``meta.answer_positions`` — exact-match accuracy (every answer token argmax-correct) and loss per
difficulty bucket. Each rank evaluates its own slice of the samples; results are summed over ranks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megasleep.sleep import SleepConfig, SleepOutput


def answer_correct(logits: torch.Tensor, input_ids: torch.Tensor, meta: list[dict]) -> list[bool | None]:
    """Per sample: all answer tokens predicted (argmax of the logits one position earlier)."""
    out: list[bool | None] = []
    pred = logits.argmax(-1)
    for b, m in enumerate(meta):
        pos = m.get("answer_positions") if isinstance(m, dict) else None
        if not pos:
            out.append(None)
            continue
        p = torch.as_tensor(pos, device=input_ids.device)
        out.append(bool((pred[b, p - 1] == input_ids[b, p]).all()))
    return out


@torch.no_grad()
def evaluate(forward: Callable[[dict, SleepConfig], SleepOutput], batches: Iterable[dict], sleep: SleepConfig,
             passes: list[int], device: torch.device) -> dict:
    """``forward(batch, sleep_cfg)`` must return a SleepOutput with logits. Returns
    ``{"N=1": {"loss", "accuracy", "window_loss": [...], "by_difficulty": {d: {...}}}, ...}``."""
    batches = list(batches)
    results = {}
    for n in passes:
        cfg = sleep.model_copy(update={"passes": n, "random_passes": None, "checkpoint": False})
        acc = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # difficulty -> correct, count, loss_sum, tokens
        win = defaultdict(lambda: [0.0, 0.0])
        total = [0.0, 0.0]
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch["loss_mask"].to(device)
            out = forward({**batch, "input_ids": ids, "loss_mask": mask,
                           "doc_ids": batch["doc_ids"].to(device)}, cfg)
            logits = out.logits.float()
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
            ce = (ce.view(ids.shape[0], -1) * mask[:, 1:]).sum(1)
            ntok = mask[:, 1:].sum(1)
            correct = answer_correct(logits, ids, batch["meta"])
            for b, m in enumerate(batch["meta"]):
                d = str(m.get("difficulty", "all")) if isinstance(m, dict) else "all"
                a = acc[d]
                if correct[b] is not None:
                    a[0] += float(correct[b])
                    a[1] += 1
                a[2] += float(ce[b])
                a[3] += float(ntok[b])
            total[0] += float(out.loss_sum)
            total[1] += out.n_tokens
            for w, (lw, tw) in enumerate(zip(out.window_loss, out.window_tokens)):
                if tw:
                    win[w][0] += lw * tw
                    win[w][1] += tw
        merged = _sum_over_ranks({"acc": dict(acc), "win": dict(win), "total": total})
        res = {"loss": merged["total"][0] / max(merged["total"][1], 1), "tokens": merged["total"][1]}
        buckets = {}
        correct_all = count_all = 0.0
        for d, (c, k, ls, nt) in sorted(merged["acc"].items(), key=lambda kv: _num(kv[0])):
            buckets[d] = {"loss": ls / max(nt, 1), "samples": int(k) if k else None}
            if k:
                buckets[d]["accuracy"] = c / k
                correct_all += c
                count_all += k
        if count_all:
            res["accuracy"] = correct_all / count_all
        res["by_difficulty"] = buckets
        res["window_loss"] = {str(w): merged["win"][w][0] / merged["win"][w][1] for w in sorted(merged["win"])}
        results[f"N={n}"] = res
    return results


def summary_line(results: dict) -> str:
    """``N=1 loss 0.512 acc 0.640 | N=2 ...``"""
    parts = []
    for n, r in results.items():
        txt = f"{n} loss {r['loss']:.4f}"
        if "accuracy" in r:
            txt += f" acc {r['accuracy']:.3f}"
        parts.append(txt)
    return " | ".join(parts)


def _num(s: str):
    try:
        return (0, float(s))
    except ValueError:
        return (1, s)


def _sum_over_ranks(local: dict) -> dict:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    acc = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    win = defaultdict(lambda: [0.0, 0.0])
    total = [0.0, 0.0]
    for g in gathered:
        for d, v in g["acc"].items():
            acc[d] = [x + y for x, y in zip(acc[d], v)]
        for w, v in g["win"].items():
            win[w] = [x + y for x, y in zip(win[w], v)]
        total = [x + y for x, y in zip(total, g["total"])]
    return {"acc": dict(acc), "win": dict(win), "total": total}


def passes_of(n_key: str) -> int:
    """The N of an evaluation key ``"N=4"``, the name :func:`evaluate` gives each N's results."""
    return int(n_key.split("=")[1])


def format_table(results_by_run: dict[str, dict], metric: str = "accuracy") -> str:
    """Markdown table: one row per (run, difficulty), one column per evaluated N."""
    ns = sorted({k for r in results_by_run.values() for k in r}, key=passes_of)
    lines = ["| model | difficulty | " + " | ".join(ns) + " |", "|---|---|" + "---|" * len(ns)]
    for run, res in results_by_run.items():
        diffs = sorted({d for r in res.values() for d in r["by_difficulty"]}, key=_num)
        for d in [*diffs, "all"]:
            cells = []
            for n in ns:
                r = res.get(n, {})
                v = r.get(metric) if d == "all" else r.get("by_difficulty", {}).get(d, {}).get(metric)
                cells.append("-" if v is None else f"{v:.3f}")
            lines.append(f"| {run} | {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
