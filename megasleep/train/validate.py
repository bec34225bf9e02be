"""Evaluation during training: the scorer of ``megasleep eval`` (:mod:`megasleep.eval.harness`) on the
run's validation samples, at every N of ``eval.eval_passes``.

    validator = build_validator(cfg, tokenizer, forward, rank, world, device)
    if validator.should_validate(step):
        results = validator.validate(step, metrics, run_dir)   # the results list of results.json

Contract: the accuracy a run logs is the one ``megasleep eval`` and the study tables report (correct
units over units, same model, N and samples). Each rank scores the same number of batches through its
DeepSpeed engine's forward (ZeRO-3 forwards are collective) and :meth:`Tally.reduce` merges them; no
``[B, T, V]`` logits are kept. With ``eval.diagnostics`` each N also gets the collapse diagnostics of
:data:`DIAG_SAMPLES` samples, measured on the plain model (under ZeRO-3 inside ``GatheredParameters``
on every rank, since gathering is collective). Doc: docs/training.md ("Evaluation during training").
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megasleep.eval.harness import (
    EvalSettings,
    Forward,
    Tally,
    batch_diagnostics,
    score_batch,
    summarize,
    summary_line,
)
from megasleep.sleep import SleepConfig
from megasleep.sleep.diagnostics import PREFIX as DIAG_PREFIX
from megasleep.sleep.diagnostics import max_key_share

# samples per N the collapse diagnostics are measured on: they cost two extra forwards and per-sample
# spectra, about 2.5 times the scoring itself per sample (tiny demo on a CPU)
DIAG_SAMPLES = 64


class Validator:
    """``should_validate(step)`` / ``validate(step)`` over fixed batches ``[(sample indices, batch)]``."""

    def __init__(self, forward: Forward, batches: list[tuple[list[int], dict]], sleep: SleepConfig, eval_passes: list[int],
                 every: int, device: torch.device, task: str | None = None, bootstrap: int = 1000, seed: int = 0,
                 model: torch.nn.Module | None = None, pad_id: int | None = None, zero3: bool = False):
        self.forward, self.batches, self.sleep, self.eval_passes = forward, batches, sleep, list(eval_passes)
        self.every, self.device, self.task = every, device, task
        # collapse diagnostics need the plain model (None: not measured); pad positions are left out
        self.model, self.pad_id, self.zero3 = model, pad_id, zero3
        self.settings = EvalSettings(eval_passes=self.eval_passes, window=sleep.window, eviction=sleep.eviction,
                                     adaptive_tol=sleep.adaptive_tol, bootstrap=bootstrap, seed=seed,
                                     scoring="teacher", progress=False)

    def __bool__(self) -> bool:
        return bool(self.batches)

    def should_validate(self, step: int) -> bool:
        return bool(self.every) and bool(self.batches) and step % self.every == 0

    @torch.no_grad()
    def scores(self) -> list[dict]:
        """One result per N (the schema of :func:`megasleep.eval.harness.summarize`), all ranks merged."""
        results = []
        for n in self.eval_passes:
            cfg = self.sleep.model_copy(update={"passes": n, "random_passes": None, "checkpoint": False})
            tally = Tally()
            for idx, batch in self.batches:
                score_batch(self.forward, batch, idx, cfg, tally, self.device)
            result = summarize(tally.reduce(), self.settings, n, self.task)
            if self.model is not None:
                result.update(self.diagnostics(cfg))
            results.append(result)
        return results

    def diagnostics(self, cfg: SleepConfig) -> dict:
        """``{"diagnostics", "collapse_status"}`` of the model at ``cfg.passes`` on this rank's first samples."""
        gather = contextlib.nullcontext()
        if self.zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        with gather:  # entered on every rank (collective), even one without a usable batch
            diag = batch_diagnostics(self.model, (b for _, b in self.batches), cfg, self.pad_id, DIAG_SAMPLES)
        return diag or {"diagnostics": None, "collapse_status": "not measured (no batch of >= 2 samples)"}

    def validate(self, step: int, metrics=None, run_dir: Path | None = None) -> list[dict]:
        """Score, log (JSONL / TensorBoard / W&B through ``metrics``) and append to ``run_dir/eval.jsonl``."""
        results = self.scores()
        if metrics is not None:
            metrics.log(step, scalars(results), kind="eval")
            metrics.write(f"[eval step {step}] {summary_line(results)}")
            if any(r.get("diagnostics") for r in results):
                metrics.write(f"[eval step {step}] {diagnostics_line(results)}")
        if run_dir is not None:
            with open(Path(run_dir) / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "results": results}) + "\n")
        return results


def scalars(results: list[dict]) -> dict:
    """The numbers worth a curve: ``{"N=2": {"loss", "accuracy", "accuracy_by_difficulty": {d: acc}, "window_loss"}}``."""
    out = {}
    for r in results:
        row: dict = {"loss": r["loss"]}
        if r.get("overall"):
            row["accuracy"] = r["overall"]["accuracy"]
            row["accuracy_by_difficulty"] = {str(b["difficulty"]): b["accuracy"] for b in r["buckets"]}
        row["window_loss"] = {str(w["window"]): w["loss"] for w in r["windows"] if w["loss"] is not None}
        if r.get("diagnostics"):  # flat "diag/pass2/G1/key_share" -> nested, logged as N=2/diag/pass2/G1/key_share
            row["diag"] = {k[len(DIAG_PREFIX):]: v for k, v in r["diagnostics"].items()}
            row["collapse_status"] = r["collapse_status"]  # a string: kept in JSONL, not a TensorBoard scalar
        out[f"N={r['passes']}"] = row
    return out


def diagnostics_line(results: list[dict]) -> str:
    """``diag N=2: memory worth 0.120 nats, key share last pass 0.41 (ok) | ...``."""
    parts = []
    for r in results:
        d = r.get("diagnostics")
        if not d:
            continue
        n = int(d.get(DIAG_PREFIX + "passes", r["passes"]))
        share = max_key_share(d, n)
        parts.append(f"N={r['passes']}: memory worth {d[DIAG_PREFIX + 'memory_worth']:.3f} nats, key share pass {n} "
                     + (f"{share:.2f}" if share is not None else "-") + f" ({r['collapse_status']})")
    return "diag " + " | ".join(parts)


def validation_batches(cfg, tokenizer, rank: int, world: int) -> tuple[list[tuple[list[int], dict]], str | None]:
    """This rank's validation batches with the global sample index of every row, and the task name.

    Task data: ``eval.samples`` generated validation samples, rank r scoring samples r, r + world, ...
    Shards: the validation loader in fixed order, rank r keeping batches r, r + world, ..."""
    from megasleep.data.sample import collate

    e, d = cfg.eval, cfg.data
    bs = e.batch_size or cfg.train.micro_batch_size
    if d.source == "task":
        from megasleep.train.data import task_eval_samples

        samples = task_eval_samples(d.task.name, tokenizer, seed=d.task.seed,
                                    difficulty=d.task.eval_difficulty or d.task.difficulty,
                                    params=d.task.params, n=e.samples)
        mine = list(range(rank, len(samples), world))
        return [(mine[i:i + bs], collate([samples[j] for j in mine[i:i + bs]], tokenizer.pad_id))
                for i in range(0, len(mine), bs)], d.task.name
    if not d.val:
        return [], None
    from megasleep.data.loader import build_loader
    from megasleep.train.data import loader_config

    # every rank reads the whole (small) validation set and keeps batches rank, rank + world, ...
    loader = build_loader(loader_config(d, "val", bs, 0, getattr(tokenizer, "hash", None)), 0, 1)
    want = math.ceil(math.ceil(e.samples / bs) / world) * world  # batches, all ranks
    out, first = [], 0
    for i, b in enumerate(loader):
        if i >= want:
            break
        n = len(b["meta"])
        if i % world == rank:
            out.append((list(range(first, first + n)), b))
        first += n
    tasks = {str(m.get("task")) for _, b in out for m in b["meta"] if isinstance(m, dict)}
    return out, (tasks.pop() if len(tasks) == 1 and "text" not in tasks else None)


def build_validator(cfg, tokenizer, forward: Forward, rank: int, world: int, device: torch.device,
                    model: torch.nn.Module | None = None, zero3: bool = False) -> Validator:
    """The trainer's validator; every rank ends with the same number of batches. ``model`` (the plain
    HybridLM) is what the collapse diagnostics run on when ``eval.diagnostics`` is on."""
    batches, task = validation_batches(cfg, tokenizer, rank, world)
    if world > 1:
        n = torch.tensor([len(batches)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
        batches = batches[:int(n.item())]
    if not batches and rank == 0 and (cfg.eval.at_end or cfg.eval.every):
        print(f"[megasleep] warning: no evaluation batches (eval.samples={cfg.eval.samples}, batch size "
              f"{cfg.eval.batch_size or cfg.train.micro_batch_size}, {world} ranks): evaluation is skipped",
              file=sys.stderr, flush=True)
    return Validator(forward, batches, cfg.sleep, cfg.eval.eval_passes, cfg.eval.every, device, task,
                     seed=cfg.train.seed, model=model if cfg.eval.diagnostics else None,
                     pad_id=getattr(tokenizer, "pad_id", None), zero3=zero3)
