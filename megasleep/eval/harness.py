"""The one scorer: a model, samples, several sleep depths N, through the training forward.

What: :func:`score_batch` runs :class:`CollectingRunner` (the training sleep loop that keeps, per
window, only the greedy prediction and CE at target positions: never more than one window of logits)
and records one outcome per scored *unit* (a Rule-110 sample's labels are one unit, each Depo query
one, a GSM integer one) in a :class:`Tally`; :meth:`Tally.reduce` is the one rank reduction;
:func:`summarize` makes the result of one N (accuracy = correct units / units with Wilson and
sample-bootstrap intervals side by side, answer loss, loss per window, GSM AUC);
:func:`batch_diagnostics` adds the collapse diagnostics.
Contract: ``megasleep eval``, the trainer (:mod:`megasleep.train.validate`), studies, the demo and
``eval compare`` all read this one results schema (:mod:`megasleep.eval.report`).
Why teacher forcing: exact match of all of a unit's tokens equals greedy decoding of the unit (every
token is predicted from a correct prefix until the first mistake); GSM answers are generated and
scored with GSM-Infinite's extraction (:mod:`megasleep.eval.scoring`). Doc: docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megasleep.eval.data import EvalData, batches
from megasleep.eval.scoring import bootstrap_ci, gsm_auc, gsm_score_generation, sample_units, wilson
from megasleep.models.norm import upcast
from megasleep.sleep.config import SleepConfig
from megasleep.sleep.loop import SleepOutput, SleepRunner

# forward(input_ids, loss_mask, doc_ids, sleep config) -> SleepOutput of a CollectingRunner
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SleepConfig], SleepOutput]


class CollectingRunner(SleepRunner):
    """SleepRunner that also keeps argmax predictions and per-position CE of windows with targets
    ([B, T] each, in ``SleepOutput.extras["predictions"]`` / ``["target_ce"]``; -1 / 0 elsewhere)."""

    def __init__(self, model, cfg: SleepConfig, backend: str | None = None):
        super().__init__(model, cfg, backend)
        self.preds: list[torch.Tensor] = []
        self.ces: list[torch.Tensor] = []

    def reset(self):
        self.preds, self.ces = [], []

    def wake_head_loss(self, h, caches, ctx, targets, target_mask, need_logits, n_targets, last=False):
        want = n_targets > 0
        logits, new, wsum = super().wake_head_loss(h, caches, ctx, targets, target_mask, need_logits or want,
                                                   n_targets, last)
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

    def __call__(self, *args, **kwargs) -> SleepOutput:
        self.reset()
        out = super().__call__(*args, **kwargs)
        out.extras["predictions"], out.extras["target_ce"] = self.collected()
        return out


def direct_forward(model, autocast_dtype: torch.dtype | None = None) -> Forward:
    """The scoring forward on a plain model (``megasleep eval``); the trainer passes its engine's."""

    def forward(ids, mask, docs, cfg: SleepConfig) -> SleepOutput:
        ctx = (torch.autocast(ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else contextlib.nullcontext())
        with torch.no_grad(), ctx:
            return CollectingRunner(model, cfg)(ids, mask, docs)

    return forward


@dataclass
class EvalSettings:
    eval_passes: list[int]             # the N to evaluate at
    window: int
    eviction: str = "hard"
    adaptive_tol: float | None = None
    batch_size: int = 16
    bootstrap: int = 1000
    seed: int = 0
    scoring: str = "auto"              # auto | teacher | generate
    max_new_tokens: int | None = None  # GSM generation budget (None: the answer's token count)
    progress: bool = True
    diagnostics_samples: int = 0       # collapse diagnostics per N on this many samples, evenly spread (0: none)
    reinject: bool = False             # the sleep switches the model was trained with that change its forward
    feedback_norm: bool = False

    def sleep_config(self, passes: int) -> SleepConfig:
        return SleepConfig(window=self.window, passes=passes, eviction=self.eviction, adaptive_tol=self.adaptive_tol,
                           reinject=self.reinject, feedback_norm=self.feedback_norm, checkpoint=False)


@dataclass
class Tally:
    """What :func:`score_batch` gathers for one N: per-sample records and per-window loss sums."""

    records: list[dict] = field(default_factory=list)
    win_sum: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    win_tok: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    win_passes: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    forwards: int = 0

    def reduce(self) -> Tally:
        """All ranks' tallies merged (records sorted by sample index); itself without a process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        mine = {"records": self.records, "win_sum": dict(self.win_sum), "win_tok": dict(self.win_tok),
                "win_passes": dict(self.win_passes), "forwards": self.forwards}
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        out = Tally()
        for p in parts:
            out.records.extend(p["records"])
            for w, v in p["win_sum"].items():
                out.win_sum[w] += v
            for w, v in p["win_tok"].items():
                out.win_tok[w] += v
            for w, v in p["win_passes"].items():
                out.win_passes[w].extend(v)
            out.forwards += p["forwards"]
        out.records.sort(key=lambda r: r["index"])
        return out


def _answer_span(meta: dict) -> list[int]:
    return sorted(int(p) for p in meta.get("answer_positions") or [])


def score_batch(forward: Forward, batch: dict, indices: list[int], cfg: SleepConfig, tally: Tally,
                device: torch.device) -> None:
    """Score one collated batch (:func:`megasleep.data.sample.collate`) at ``cfg.passes``: one record
    per row into ``tally`` (``indices[r]`` names row r's sample), and the window loss sums."""
    ids = torch.as_tensor(batch["input_ids"]).long().to(device)
    mask = torch.as_tensor(batch["loss_mask"]).bool().to(device)
    docs = batch.get("doc_ids")
    docs = torch.as_tensor(docs).long().to(device) if docs is not None else None
    out = forward(ids, mask, docs, cfg)
    tally.forwards += out.forwards
    for w, (loss_sum, n) in enumerate(zip(out.window_loss_sum.tolist(), out.window_tokens)):
        if n:
            tally.win_sum[w] += loss_sum
            tally.win_tok[w] += n
        tally.win_passes[w].append(out.passes_used[w])
    preds, ces = out.extras["predictions"].cpu(), out.extras["target_ce"].cpu()
    row_ids, tokens = ids.cpu(), mask.sum(1).tolist()
    for r, i in enumerate(indices):
        meta = batch["meta"][r] if isinstance(batch["meta"][r], dict) else {}
        units = sample_units(meta)
        rec = {"index": i, "passes": cfg.passes, "tokens": int(tokens[r])}
        if units:
            hits = [int(all(int(preds[r, p - 1]) == int(row_ids[r, p]) for p in pos)) for pos in units]
            ans = _answer_span(meta)
            rec.update(difficulty=meta.get("difficulty"), units=len(units), correct=sum(hits), unit_correct=hits,
                       tf_correct=sum(hits), answer_tokens=len(ans),
                       answer_loss_sum=float(sum(float(ces[r, p - 1]) for p in ans)),
                       pred_answer_ids=[int(preds[r, p - 1]) for p in ans])
        tally.records.append(rec)


def batch_diagnostics(model, collated: Iterable[dict], cfg: SleepConfig, pad_id: int | None,
                      max_samples: int) -> dict | None:
    """Collapse diagnostics of ``model`` at ``cfg.passes`` on the first ``max_samples`` rows of the
    batches ``collated`` (:func:`megasleep.data.sample.collate`), in pieces of at least 2 rows (memory
    worth gives each row another row's fast weights): ``{"diagnostics": {"diag/...": value},
    "collapse_status": status}`` with the status against the model's own wake pass, or None when no
    piece qualifies. Their cost grows with the rows (two extra forwards and per-sample spectra)."""
    from megasleep.sleep.diagnostics import collapse_diagnostics, collapse_status
    from megasleep.train.data import as_batch

    chosen, rows = [], 0
    for b in collated:
        take = min(len(b["input_ids"]), max_samples - rows)
        if take < 2:
            break
        one = as_batch(b)
        chosen.append({k: v[:take] for k, v in one.items()})
        rows += take
    if not chosen:
        return None
    diag = collapse_diagnostics(model, chosen, cfg, pad_id)
    return {"diagnostics": diag, "collapse_status": collapse_status(diag)}


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
    with torch.no_grad():
        preds = runner(ids.to(device), mask.to(device)).extras["predictions"]
    return [int(preds[r, len(s) - 1]) for r, s in enumerate(seqs)]


def greedy_stream(model, sleep_cfg: SleepConfig, prefix: list[int], max_steps: int,
                  stop_ids: set[int] | None = None):
    """Greedy continuation of ``prefix`` through the streaming engine (prefill, then one wake step per
    token; it gives the chunked sleep forward's logits, docs/sleep.md). Yields up to ``max_steps`` tokens and
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


def evaluate_passes(model, data: EvalData, settings: EvalSettings, passes: int, tokenizer=None) -> tuple[dict, list[dict]]:
    """Evaluate at one sleep depth. Returns (result dict, per-sample records)."""
    from tqdm import tqdm

    device = _device_of(model)
    cfg = settings.sleep_config(passes)
    pad_id = getattr(tokenizer, "pad_id", 0) if tokenizer is not None else 0
    if not 0 <= pad_id < model.config.vocab_size:
        pad_id = 0
    tally = Tally()
    t0 = time.perf_counter()
    forward = direct_forward(model)
    bar = tqdm(batches(data.samples, settings.batch_size, pad_id), total=math.ceil(len(data.samples) /
               settings.batch_size), desc=f"N={passes}", unit="batch", disable=not settings.progress, leave=False)
    for idx, batch in bar:
        score_batch(forward, batch, idx, cfg, tally, device)
    bar.close()
    tally.records.sort(key=lambda r: r["index"])
    scoring = "teacher"
    if data.kind == "task" and _uses_generation(data, settings):
        scoring = "generate"
        _gsm_generate(model, cfg, data, tally.records, settings, tokenizer, pad_id)
    result = summarize(tally, settings, passes, data.task if data.kind == "task" else None)
    result.update(seconds=round(time.perf_counter() - t0, 3), scoring=scoring if data.kind == "task" else None)
    if settings.diagnostics_samples:
        k = min(settings.diagnostics_samples, len(data.samples))  # evenly spread: every difficulty, every length
        chosen = [data.samples[i * len(data.samples) // k] for i in range(k)] if k else []
        diag = batch_diagnostics(model, (b for _, b in batches(chosen, settings.batch_size, pad_id)), cfg,
                                 pad_id if tokenizer is not None else None, k)
        result.update(diag or {"diagnostics": None, "collapse_status": "not measured (fewer than 2 samples)"})
    return result, tally.records


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
        rec.update(correct=int(ok), units=1, unit_correct=[int(ok)], generated=text, extracted=got)


def unit_stats(recs: list[dict], n_boot: int, seed: int) -> dict:
    """Accuracy over the scored units of ``recs`` with both 95% intervals: Wilson (``wilson_low`` /
    ``wilson_high``: units independent) and the sample bootstrap (``ci_low`` / ``ci_high``: a sample's
    units resampled together, so Depo's correlated queries do not shrink it)."""
    c = [r["correct"] for r in recs]
    u = [r["units"] for r in recs]
    acc, lo, hi = bootstrap_ci(c, u, n_boot, seed=seed)
    wlo, whi = wilson(sum(c), sum(u))
    at = sum(r["answer_tokens"] for r in recs)
    al = sum(r["answer_loss_sum"] for r in recs) / at if at else None
    tf = sum(r.get("tf_correct", r["correct"]) for r in recs) / max(1, sum(u))
    return {"n_samples": len(recs), "n_units": int(sum(u)), "correct": int(sum(c)), "accuracy": acc,
            "ci_low": lo, "ci_high": hi, "wilson_low": wlo, "wilson_high": whi, "answer_loss": al,
            "answer_tokens": at, "teacher_forced_accuracy": tf}


def summarize(tally: Tally, settings: EvalSettings, passes: int, task: str | None = None) -> dict:
    """The result of one N (the schema of ``results.json``'s ``results`` entries)."""
    win_sum, win_tok, win_passes, records = tally.win_sum, tally.win_tok, tally.win_passes, tally.records
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
                    "tokens": tot_tok, "forwards": tally.forwards, "windows": windows, "buckets": [],
                    "overall": None, "gsm": None, "adaptive": None}
    if settings.adaptive_tol is not None:
        allp = [p for w in win_passes.values() for p in w]
        hist: dict[str, int] = defaultdict(int)
        for p in allp:
            hist[str(p)] += 1
        result["adaptive"] = {"tol": settings.adaptive_tol, "max_passes": passes,
                              "mean_passes_used": float(np.mean(allp)) if allp else None,
                              "histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
                              "note": "passes used is decided per batch and window (the largest change in the batch)"}
    scored = [r for r in records if r.get("units")]
    if not scored:
        return result
    by_d: dict = defaultdict(list)
    for r in scored:
        by_d[r["difficulty"]].append(r)
    result["overall"] = unit_stats(scored, settings.bootstrap, settings.seed)
    result["buckets"] = [{"difficulty": d, **unit_stats(by_d[d], settings.bootstrap, settings.seed)}
                         for d in sorted(by_d, key=_diff_key)]
    if task == "gsm":
        pts = [(b["difficulty"], b["accuracy"]) for b in result["buckets"] if isinstance(b["difficulty"], (int, float))]
        result["gsm"] = {"auc": gsm_auc([p[0] for p in pts], [p[1] for p in pts]),
                         "ops": [p[0] for p in pts],
                         "auc_definition": "trapezoidal area under accuracy vs ops, x100 (GSM-Infinite app.py)"}
    return result


def _diff_key(d):
    return (0, d) if isinstance(d, (int, float)) else (1, str(d))


def evaluate(model, data: EvalData, settings: EvalSettings, tokenizer=None) -> tuple[list[dict], list[dict]]:
    """All N in ``settings.eval_passes``: (results per N, per-sample records)."""
    model.eval()
    results, records = [], []
    for n in settings.eval_passes:
        res, recs = evaluate_passes(model, data, settings, n, tokenizer)
        results.append(res)
        for r in recs:
            r.pop("pred_answer_ids", None)
        records.extend(recs)
    return results, records


def by_passes(results: Iterable[dict]) -> dict[int, dict]:
    """``{N: result}`` of a results list (every reader indexes results by N this way)."""
    return {int(r["passes"]): r for r in results}


def summary_line(results: list[dict]) -> str:
    """``N=1 loss 0.5120 acc 0.640 | N=2 ...`` (accuracy over scored units)."""
    parts = []
    for r in results:
        txt = f"N={r['passes']} loss {r['loss']:.4f}" if r.get("loss") is not None else f"N={r['passes']}"
        if r.get("overall"):
            txt += f" acc {r['overall']['accuracy']:.3f}"
        parts.append(txt)
    return " | ".join(parts)


__all__ = ["CollectingRunner", "EvalSettings", "Forward", "Tally", "batch_diagnostics", "by_passes", "direct_forward",
           "evaluate", "evaluate_passes", "greedy_generate", "greedy_stream", "next_tokens", "score_batch", "summarize",
           "summary_line", "unit_stats"]
