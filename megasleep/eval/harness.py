"""The evaluation loop: one model, one dataset, several sleep depths N, through the training forward.

Every N runs :class:`megasleep.sleep.loop.SleepRunner` (the same sleep loop as training) over batches
of samples. A small subclass keeps, per window, the greedy prediction and the cross-entropy at every
target position (logits never exist for more than one window at a time), from which:

* task data: per difficulty bucket, exact-match accuracy over scored units (a Rule-110 sample's 4
  labels; each Depo query's 2 answer tokens; a GSM integer) with a sample-level bootstrap 95%
  interval, and the mean answer loss (CE per answer token). Teacher-forced exact match of all of a
  unit's tokens equals greedy decoding of that unit (each token is predicted from a correct prefix
  until the first mistake, which makes the unit wrong either way).
* GSM: the integer is *generated* greedily after the ``Answer:`` cue and scored with GSM-Infinite's
  extraction (:mod:`megasleep.eval.scoring`); the AUC of accuracy vs ops is reported too.
* every dataset: loss and perplexity per window index (does sleep help later windows?), and, with
  ``adaptive_tol``, the passes actually used per window.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from megasleep.eval.data import EvalData, batches
from megasleep.eval.scoring import bootstrap_ci, gsm_auc, gsm_score_generation, sample_units
from megasleep.models.norm import upcast
from megasleep.sleep.config import SleepConfig
from megasleep.sleep.loop import SleepRunner


class CollectingRunner(SleepRunner):
    """SleepRunner that also keeps argmax predictions and per-position CE of windows with targets."""

    def __init__(self, model, cfg: SleepConfig, backend: str | None = None):
        super().__init__(model, cfg, backend)
        self.preds: list[torch.Tensor] = []
        self.ces: list[torch.Tensor] = []

    def reset(self):
        self.preds, self.ces = [], []

    def wake_head_loss(self, h, caches, ctx, targets, target_mask, need_logits):
        want = bool(target_mask.any())
        logits, new, wsum = super().wake_head_loss(h, caches, ctx, targets, target_mask, need_logits or want)
        if want:
            self.preds.append(logits.argmax(-1))
            ce = F.cross_entropy(upcast(logits).flatten(0, 1), targets.flatten(), reduction="none")
            self.ces.append(ce.view_as(targets).float())
        else:
            self.preds.append(torch.full_like(targets, -1))
            self.ces.append(torch.zeros(targets.shape, device=targets.device))
        return (logits if need_logits else None), new, wsum

    def collected(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.preds, 1), torch.cat(self.ces, 1)


@dataclass
class EvalSettings:
    passes: list[int]
    window: int
    eviction: str = "hard"
    adaptive_tol: float | None = None
    batch_size: int = 16
    bootstrap: int = 1000
    seed: int = 0
    scoring: str = "auto"              # auto | teacher | generate
    max_new_tokens: int | None = None  # GSM generation budget (None: the answer's token count)
    progress: bool = True

    def sleep_config(self, passes: int) -> SleepConfig:
        return SleepConfig(window=self.window, passes=passes, eviction=self.eviction,
                           adaptive_tol=self.adaptive_tol, checkpoint=False)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def next_tokens(runner: CollectingRunner, seqs: list[list[int]], pad_id: int = 0) -> list[int]:
    """Greedy next token after each sequence (one batched sleep forward; right padding)."""
    device = _device_of(runner.model)
    T = max(len(s) for s in seqs) + 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, len(s)] = True  # a target slot right after the sequence: its prediction is kept
    runner.reset()
    with torch.no_grad():
        runner(ids.to(device), mask.to(device))
    preds, _ = runner.collected()
    return [int(preds[r, len(s) - 1]) for r, s in enumerate(seqs)]


def greedy_stream(model, sleep_cfg: SleepConfig, prefix: list[int], max_steps: int,
                  stop_ids: set[int] | None = None):
    """Greedy continuation of ``prefix`` through the streaming engine (prefill, then one wake step per
    token; it gives the chunked sleep forward's logits, SPEC §3). Yields up to ``max_steps`` tokens and
    stops after a token in ``stop_ids``."""
    from megasleep.inference import Session

    if max_steps <= 0:
        return
    session = Session(model, sleep_cfg, batch=1, device=_device_of(model))
    with torch.no_grad():
        logits = session.feed([prefix], logits="last")
        for i in range(max_steps):
            tok = int(logits[0].argmax())
            yield tok
            if (stop_ids and tok in stop_ids) or i + 1 == max_steps:
                return
            logits = session.step([tok])


def greedy_generate(model, sleep_cfg: SleepConfig, prefixes: list[list[int]], steps: list[int], pad_id: int = 0,
                    batch_size: int = 8, stop_ids: set[int] | None = None) -> list[list[int]]:
    """Greedy continuation of each prefix for ``steps[i]`` tokens (see :func:`greedy_stream`)."""
    return [list(greedy_stream(model, sleep_cfg, p, n, stop_ids)) for p, n in zip(prefixes, steps)]


def _answer_span(meta: dict) -> list[int]:
    return sorted(int(p) for p in meta.get("answer_positions") or [])


def evaluate_passes(model, data: EvalData, settings: EvalSettings, passes: int, tokenizer=None) -> tuple[dict, list[dict]]:
    """Evaluate at one sleep depth. Returns (result dict, per-sample records)."""
    from tqdm import tqdm

    device = _device_of(model)
    cfg = settings.sleep_config(passes)
    runner = CollectingRunner(model, cfg)
    pad_id = getattr(tokenizer, "pad_id", 0) if tokenizer is not None else 0
    if not 0 <= pad_id < model.config.vocab_size:
        pad_id = 0
    is_task = data.kind == "task"
    win_sum: dict[int, float] = defaultdict(float)
    win_tok: dict[int, int] = defaultdict(int)
    win_passes: dict[int, list[int]] = defaultdict(list)
    records: list[dict] = []
    forwards = 0
    t0 = time.perf_counter()
    n_batches = math.ceil(len(data.samples) / settings.batch_size)
    bar = tqdm(batches(data.samples, settings.batch_size, pad_id), total=n_batches, desc=f"N={passes}",
               unit="batch", disable=not settings.progress, leave=False)
    for idx, ids_np, mask_np, docs_np, _lens in bar:
        ids = torch.from_numpy(ids_np).to(device)
        mask = torch.from_numpy(mask_np).to(device)
        docs = torch.from_numpy(docs_np).to(device) if docs_np is not None else None
        runner.reset()
        with torch.no_grad():
            out = runner(ids, mask, docs)
        forwards += out.forwards
        for w, (loss, n) in enumerate(zip(out.window_loss, out.window_tokens)):
            if n:
                win_sum[w] += loss * n
                win_tok[w] += n
            win_passes[w].append(out.passes_used[w])
        if not is_task:
            for r, i in enumerate(idx):
                records.append({"index": i, "passes": passes, "tokens": int(mask_np[r].sum())})
            continue
        preds, ces = runner.collected()
        preds, ces = preds.cpu(), ces.cpu()
        for r, i in enumerate(idx):
            s = data.samples[i]
            meta = s["meta"]
            units = sample_units(meta)
            row_ids = ids_np[r]
            correct = 0
            for pos in units:
                if all(int(preds[r, p - 1]) == int(row_ids[p]) for p in pos):
                    correct += 1
            ans = _answer_span(meta)
            ce_sum = float(sum(float(ces[r, p - 1]) for p in ans))
            records.append({
                "index": i, "passes": passes, "difficulty": meta.get("difficulty"), "units": len(units),
                "correct": correct, "tf_correct": correct, "answer_tokens": len(ans), "answer_loss_sum": ce_sum,
                "pred_answer_ids": [int(preds[r, p - 1]) for p in ans],
            })
    bar.close()
    scoring = "teacher"
    if is_task and _uses_generation(data, settings):
        scoring = "generate"
        _gsm_generate(model, cfg, data, records, settings, tokenizer, pad_id)
    seconds = time.perf_counter() - t0
    result = summarize(data, records, settings, passes, win_sum, win_tok, win_passes)
    result.update(seconds=round(seconds, 3), forwards=forwards, scoring=scoring if is_task else None)
    return result, records


def _uses_generation(data: EvalData, settings: EvalSettings) -> bool:
    gsm = data.task == "gsm" or any(s["meta"].get("task") == "gsm" for s in data.samples[:1])
    if settings.scoring == "generate" and not gsm:
        raise ValueError(f"--scoring generate applies to GSM (integer answers), not to task {data.task!r}; its "
                         "teacher-forced exact match already equals greedy decoding of the answer")
    return gsm and settings.scoring != "teacher"


def _gsm_generate(model, cfg, data: EvalData, records: list[dict], settings: EvalSettings, tokenizer, pad_id: int):
    """Greedy generation of the answer after the prompt; GSM-Infinite extraction decides correctness.

    The teacher-forced predictions already are the greedy continuation up to and including the first
    wrong token (same prefix, causal model), so only samples that went wrong, or a budget beyond the
    answer length, need extra forwards."""
    if tokenizer is None:
        raise ValueError("GSM scoring by generation needs the tokenizer (the checkpoint has no tokenizer.model; "
                         "use --scoring teacher, or export the model with its tokenizer)")
    stop = {tokenizer.eos_id} if getattr(tokenizer, "eos_id", -1) >= 0 else set()
    prefixes, steps, gen = [], [], []
    for rec in records:
        s = data.samples[rec["index"]]
        ans = _answer_span(s["meta"])
        if not ans:
            prefixes.append([]), steps.append(0), gen.append([])
            continue
        budget = settings.max_new_tokens or len(ans)
        tf = rec["pred_answer_ids"]
        truth = [int(s["input_ids"][p]) for p in ans]
        k = 0  # tokens of the greedy continuation known from the teacher-forced pass
        while k < min(len(tf), budget):
            k += 1
            if tf[k - 1] != truth[k - 1] or tf[k - 1] in stop:
                break
        g = tf[:k]
        gen.append(g)
        prefixes.append([int(x) for x in s["input_ids"][:ans[0]]] + g)
        steps.append(0 if (g and g[-1] in stop) else budget - k)
    extra = greedy_generate(model, cfg, prefixes, steps, pad_id, settings.batch_size, stop)
    for rec, g, e in zip(records, gen, extra):
        s = data.samples[rec["index"]]
        toks = g + e
        if stop:
            cut = next((j for j, t in enumerate(toks) if t in stop), len(toks))
            toks = toks[:cut]
        text = tokenizer.decode(toks)
        ok, got = gsm_score_generation(text, s["meta"].get("answer"))
        rec.update(correct=int(ok), units=1, generated=text, extracted=got)


def summarize(data: EvalData, records: list[dict], settings: EvalSettings, passes: int, win_sum, win_tok,
              win_passes) -> dict:
    windows = []
    for w in sorted(set(win_tok) | set(win_passes)):
        n = win_tok.get(w, 0)
        loss = win_sum[w] / n if n else None
        used = win_passes.get(w) or []
        windows.append({"window": w, "tokens": n, "loss": loss, "ppl": math.exp(loss) if loss is not None else None,
                        "mean_passes_used": float(np.mean(used)) if used else None})
    tot_tok = sum(win_tok.values())
    tot_loss = sum(win_sum.values()) / tot_tok if tot_tok else None
    result: dict = {"passes": passes, "n_examples": len(records),
                    "loss": tot_loss, "ppl": math.exp(tot_loss) if tot_loss is not None else None,
                    "tokens": tot_tok, "windows": windows, "buckets": [], "overall": None, "gsm": None,
                    "adaptive": None}
    if settings.adaptive_tol is not None:
        allp = [p for w in win_passes.values() for p in w]
        hist: dict[str, int] = defaultdict(int)
        for p in allp:
            hist[str(p)] += 1
        result["adaptive"] = {"tol": settings.adaptive_tol, "max_passes": passes,
                              "mean_passes_used": float(np.mean(allp)) if allp else None,
                              "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                              "note": "passes used is decided per batch and window (the largest change in the batch)"}
    if data.kind != "task":
        return result

    def stats(recs: list[dict]) -> dict:
        c = [r["correct"] for r in recs]
        u = [r["units"] for r in recs]
        acc, lo, hi = bootstrap_ci(c, u, settings.bootstrap, seed=settings.seed)
        at = sum(r["answer_tokens"] for r in recs)
        al = sum(r["answer_loss_sum"] for r in recs) / at if at else None
        tf_acc = (sum(r["tf_correct"] for r in recs) / max(1, sum(len(sample_units(data.samples[r['index']]['meta']))
                                                                    for r in recs)))
        return {"n_samples": len(recs), "n_units": int(sum(u)), "accuracy": acc, "ci_low": lo, "ci_high": hi,
                "answer_loss": al, "answer_tokens": at, "teacher_forced_accuracy": tf_acc}

    by_d: dict = defaultdict(list)
    for r in records:
        by_d[r["difficulty"]].append(r)
    result["overall"] = stats(records)
    result["buckets"] = [{"difficulty": d, **stats(by_d[d])} for d in sorted(by_d, key=_diff_key)]
    if data.task == "gsm":
        pts = [(b["difficulty"], b["accuracy"]) for b in result["buckets"] if isinstance(b["difficulty"], (int, float))]
        result["gsm"] = {"auc": gsm_auc([p[0] for p in pts], [p[1] for p in pts]),
                         "ops": [p[0] for p in pts],
                         "auc_definition": "trapezoidal area under accuracy vs ops, x100 (GSM-Infinite app.py)"}
    return result


def _diff_key(d):
    return (0, d) if isinstance(d, (int, float)) else (1, str(d))


def evaluate(model, data: EvalData, settings: EvalSettings, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """All N in ``settings.passes``: (results per N, per-sample records)."""
    model.eval()
    results, records = [], []
    for n in settings.passes:
        res, recs = evaluate_passes(model, data, settings, n, tokenizer)
        results.append(res)
        for r in recs:
            r.pop("pred_answer_ids", None)
        records.extend(recs)
    return results, records


__all__ = ["CollectingRunner", "EvalSettings", "evaluate", "evaluate_passes", "greedy_generate", "greedy_stream", "next_tokens",
           "summarize"]
