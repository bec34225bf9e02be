"""From a folder of text to a ready experiment: tokenizer, train / validation shards and a config.

    megasleep data text --input /usr/lib/python3.11/ --out data/pystdlib --vocab-size 8000 --seq-len 4096

writes::

    OUT/tokenizer/text.model      sentencepiece, text kept intact (newlines, indentation, spaces)
    OUT/train/, OUT/val/          shards of seq_len tokens + manifest.json (documents packed whole,
                                  their starts recorded); every k-th document goes to val
    OUT/experiment.yaml           data, tokenizer and model.vocab_size filled in: `megasleep train OUT/experiment.yaml`

The walk-through is docs/data.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import yaml

from megasleep.atomic import atomic_write

DEFAULT_MODEL = "configs/models/tiny.yaml"
_log = logging.getLogger(__name__)


def experiment_config(out: Path, vocab_size: int, seq_len: int, window: int, passes: int, model: str,
                      steps: int, batch_size: int) -> dict:
    """The experiment YAML for the dataset under ``out`` (absolute paths, so it runs from any directory)."""
    out = out.resolve()
    return {
        "name": out.name,
        "run_dir": "runs/{name}",
        "model": {"base": model, "vocab_size": vocab_size},
        "sleep": {"window": window, "passes": passes, "eviction": "hard", "checkpoint": True},
        "data": {
            "source": "shards",
            "tokenizer": str(out / "tokenizer" / "text.model"),
            "train": str(out / "train"),
            "val": str(out / "val"),
            "loader": {"seq_len": seq_len, "num_workers": 1, "shuffle_buffer": 100},
        },
        "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.01, "schedule": "cosine",
                  "warmup_steps": steps // 10, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "train": {"steps": steps, "global_batch_size": batch_size, "micro_batch_size": batch_size,
                  "log_every": max(1, steps // 20)},
        "checkpoint": {"every": max(1, steps // 2), "keep_last": 2},
        "deepspeed": {"config": "configs/deepspeed/zero1.json"},
        "eval": {"eval_passes": sorted({1, passes}), "samples": 8, "batch_size": batch_size},
    }


def build_text_experiment(
    inputs,
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8000,
    seq_len: int = 4096,
    window: int | None = None,
    passes: int = 2,
    val_every: int = 50,
    model: str = DEFAULT_MODEL,
    text_field: str = "text",
    steps: int = 200,
    batch_size: int = 2,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = _log.info,
) -> dict:
    """Tokenizer + train/val shards + ``experiment.yaml`` for the corpus ``inputs`` under ``out_dir``.

    ``val_every``: every ``val_every``-th document (0-based index ``k`` with ``k % val_every ==
    val_every - 1``; at least the last one of a small corpus) goes to validation, the rest to
    training. ``window`` defaults to ``min(2048, seq_len)``. Returns ``{"tokenizer", "train", "val",
    "config"}`` (the train and val manifests, the config path).
    """
    from megasleep.data.corpus import corpus_report, scan_corpus
    from megasleep.data.shards import build_text_dataset
    from megasleep.data.tokenizer import train_tokenizer

    if seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {seq_len}")
    if val_every < 2:
        raise ValueError(f"--val-every must be >= 2 (one document in val_every goes to validation), got {val_every}")
    window = window or min(2048, seq_len)
    if seq_len % window:
        raise ValueError(f"--seq-len {seq_len} must be a multiple of --window {window} (whole windows per sequence)")
    out = Path(out_dir)
    scan = scan_corpus(inputs)  # a missing / empty input fails here, before any work

    read: dict = {}
    tok = train_tokenizer(out / "tokenizer" / "text", corpus=scan, text_field=text_field, vocab_size=vocab_size,
                          stats=read)
    for line in corpus_report(read):
        log(line)
    n_docs = read["documents"]
    if n_docs < 2:
        raise ValueError(f"{inputs}: {n_docs} document(s); at least 2 are needed (one goes to validation)")
    every = min(val_every, n_docs)
    log(f"tokenizer {tok.path}: vocab_size={tok.vocab_size} hash={tok.hash[:12]}")

    manifests = {}
    for split, keep in (("train", lambda k: k % every != every - 1), ("val", lambda k: k % every == every - 1)):
        m = build_text_dataset(scan, out / split, tok.path, seq_len, text_field=text_field, workers=workers,
                               progress=progress, name=split, select=keep)
        manifests[split] = m
        log(f"{split}: {m['documents']} documents, {m['document_bytes']:,} bytes -> {m['num_samples']} sequences "
            f"of {seq_len} tokens ({m['num_tokens']:,} tokens), {len(m['shards'])} shards -> {out / split}")

    cfg = experiment_config(out, tok.vocab_size, seq_len, window, passes, model, steps, batch_size)
    path = out / "experiment.yaml"
    header = (f"# Written by `megasleep data text` for {', '.join(map(str, scan_inputs(inputs)))}\n"
              f"# ({n_docs} documents; tokenizer vocab_size {tok.vocab_size}). Train: megasleep train {path}\n")
    atomic_write(path, header + yaml.safe_dump(cfg, sort_keys=False))
    log(f"experiment config -> {path}")
    return {"tokenizer": tok, "train": manifests["train"], "val": manifests["val"], "config": path}


def scan_inputs(inputs) -> list[str]:
    return [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(i) for i in inputs]
