"""Evaluation inputs: samples read in order from shards, or generated on the fly from a task.

Evaluation reads every sample once, in shard order (no shuffling, no rank split), so ``--max-examples
K`` always means the same first K samples. Samples are the in-memory dicts of
:mod:`megasleep.data.sample` (``input_ids``, ``loss_mask``, ``doc_starts``, ``meta``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# default window L per task (docs/tasks.md)
TASK_WINDOWS = {"rule110": 24, "depo": 75, "gsm": 2000}


class UnknownTaskError(ValueError):
    """``--task`` names no task generator."""


@dataclass
class EvalData:
    samples: list[dict]
    kind: str                             # "task" | "text"
    task: str | None
    difficulty_name: str
    info: dict = field(default_factory=dict)   # what the results record about the data
    tokenizer_hash: str | None = None


def iter_shard(url: str, vocab_size: int | None = None) -> Iterator[dict]:
    """Decoded samples of one tar shard (a path or any URL webdataset's ``gopen`` reads; either shard
    format, :mod:`megasleep.data.block`), in file order. A malformed sample raises
    :class:`~megasleep.data.sample.MalformedSample` naming the shard and the sample."""
    from megasleep.data.block import read_shard
    from megasleep.data.sample import MalformedSample

    for _, s in read_shard(url, vocab_size):
        if isinstance(s, MalformedSample):
            raise MalformedSample(f"{url}: {s}")
        yield s


def read_shards(spec, max_examples: int | None = None, vocab_size: int | None = None) -> tuple[list[dict], dict | None, list[str]]:
    """(samples, manifest or None, shard urls) of a dataset spec (dir with manifest.json, glob, brace
    pattern, URL; see :func:`megasleep.data.manifest.resolve_shards`)."""
    from megasleep.data.manifest import resolve_shards

    urls, manifest = resolve_shards(spec)
    out: list[dict] = []
    for u in urls:
        for s in iter_shard(u, vocab_size):
            out.append(s)
            if max_examples is not None and len(out) >= max_examples:
                return out, manifest, urls
    return out, manifest, urls


def _manifest_summary(m: dict | None) -> dict | None:
    if m is None:
        return None
    keep = {k: v for k, v in m.items() if k != "shards"}
    keep["shards"] = [{k: s.get(k) for k in ("name", "samples", "tokens", "sha256")} for s in m.get("shards", [])]
    return keep


def load_shard_data(spec, max_examples: int | None = None, vocab_size: int | None = None) -> EvalData:
    samples, manifest, urls = read_shards(spec, max_examples, vocab_size)
    if not samples:
        raise ValueError(f"dataset {spec}: no samples")
    tasks = sorted({str(s["meta"].get("task")) for s in samples})
    kind = "text" if tasks == ["text"] or (manifest or {}).get("kind") == "text" else "task"
    task = None if kind == "text" else (tasks[0] if len(tasks) == 1 else "mixed")
    diff_name = ((manifest or {}).get("difficulty") or {}).get("name")
    if diff_name is None and task is not None:
        try:
            from megasleep.data.tasks import get_task

            diff_name = get_task(task).difficulty_name
        except Exception:
            diff_name = None
    info = {"source": "shards", "spec": str(spec), "shards": urls, "n_examples": len(samples),
            "max_examples": max_examples, "manifest_path": (manifest or {}).get("_path"),
            "manifest": _manifest_summary(manifest)}
    tok_hash = ((manifest or {}).get("tokenizer") or {}).get("hash")
    return EvalData(samples, kind, task, diff_name or "difficulty", info, tok_hash)


def generate_task_data(task: str, tokenizer, n_per_difficulty: int, difficulties, seed: int = 0, split: str = "test",
                       params: dict | None = None) -> EvalData:
    """``n_per_difficulty`` fresh samples for every difficulty in ``difficulties`` (task-spec syntax:
    ``"1-16"``, ``"1,2,4"``). Sample ``j`` of difficulty number ``k`` uses generator index
    ``k * n_per_difficulty + j`` of ``split`` (default "test", disjoint from the train stream)."""
    from megasleep.data.tasks import TASKS, parse_difficulty

    if task not in TASKS:
        raise UnknownTaskError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    spec = TASKS[task]
    params = spec.params(**(params or {}))
    diffs = parse_difficulty(difficulties)
    samples = []
    for k, d in enumerate(diffs):
        for j in range(n_per_difficulty):
            samples.append(spec.sample(seed, split, k * n_per_difficulty + j, [d], tokenizer, **params))
    info = {"source": "generator", "task": task, "generator": spec.generator, "generator_version": spec.version,
            "params": params, "difficulties": diffs, "n_per_difficulty": n_per_difficulty, "seed": seed,
            "split": split, "n_examples": len(samples)}
    return EvalData(samples, "task", task, spec.difficulty_name, info, getattr(tokenizer, "hash", None))


def batches(samples: list[dict], batch_size: int, pad_id: int = 0, sort: bool = True):
    """Yield (sample indices, collated numpy batch) (:func:`megasleep.data.sample.collate`). With
    ``sort`` rows of similar length share a batch (less padding)."""
    from megasleep.data.sample import collate

    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"])) if sort else list(range(len(samples)))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        yield idx, collate([samples[i] for i in idx], pad_id)


def resolve_tokenizer(checkpoint_tokenizer: Path | None, task: str | None, workdir: Path):
    """The tokenizer for generating task samples: the checkpoint's own, else the task's (deterministic)
    alphabet tokenizer built into ``workdir``."""
    from megasleep.data.tokenizer import load_tokenizer

    if checkpoint_tokenizer is not None:
        return load_tokenizer(checkpoint_tokenizer)
    if task is None:
        return None
    from megasleep.data.tasks import TASKS

    if task not in TASKS:
        raise UnknownTaskError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    return TASKS[task].make_task_tokenizer(workdir)


__all__ = ["TASK_WINDOWS", "EvalData", "UnknownTaskError", "batches", "generate_task_data", "iter_shard",
           "load_shard_data", "read_shards", "resolve_tokenizer"]
