"""Import a local copy of the official GSM-Infinite data (parquet / jsonl, as published).

The published files (Hugging Face ``InfiniAILab/gsm_infinite_*``: one split per op count,
``ops_2``, ``ops_3``, ..., stored as ``data/ops_N-*.parquet``; the generator's jsonl files
``igsm_op{N}_ip20_force_True_{i}.jsonl``) have one row per problem with the columns::

    problem   the context (long; distractors included)        str
    question  e.g. "What is the total number of adult animals in Maple Creek?"   str
    solution  the reference chain of thought, ending "Answer: <int>."           str
    op        number of operations                            int
    id, template, mode, length, d                             kept in meta

Each row becomes one sample in our GSM layout (question first, then the context, then ``Answer:``
and the integer; loss on the answer tokens only), with ``meta.origin = "gsm-infinite"``. A row with a
missing column or no parsable answer is skipped with a warning and counted.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator

import numpy as np

from megasleep.data.corpus import _rows, expand_paths
from megasleep.data.sample import make_sample as _make
from megasleep.data.tasks import gsm

VERSION = "1"
REQUIRED_COLUMNS = ("problem", "question", "solution", "op")
EXTRA_COLUMNS = ("id", "template", "mode", "length", "d")
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")


def parse_answer(solution: str) -> int:
    """The integer after the last ``Answer:`` in an official solution string."""
    hits = _ANSWER_RE.findall(solution or "")
    if not hits:
        raise ValueError("no 'Answer: <int>' in solution")
    return int(hits[-1])


def row_to_sample(row: dict, tokenizer, source: str = "", index: int = 0, max_len: int | None = None) -> dict:
    missing = [c for c in REQUIRED_COLUMNS if row.get(c) is None]
    if missing:
        raise ValueError(f"row lacks columns {missing}")
    answer = str(row["answer"]) if row.get("answer") is not None else str(parse_answer(row["solution"]))
    question = "Question: " + str(row["question"]).strip()
    ids, positions = gsm.layout(tokenizer, question, str(row["problem"]).strip(), answer)
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"{len(ids)} tokens > max_len={max_len}")
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[positions] = 1
    meta = {
        "task": gsm.NAME,
        "difficulty": int(row["op"]),
        "answer": answer,
        "answer_positions": positions,
        "origin": "gsm-infinite",
        "importer_version": VERSION,
        "source": source,
        "row": int(index),
        "length": len(ids),
    }
    for c in EXTRA_COLUMNS:
        if c in row and row[c] is not None:
            v = row[c]
            meta[c] = v.item() if hasattr(v, "item") else v
    return _make(ids, mask, meta)


def iter_official(paths, tokenizer, max_len: int | None = None, stats: dict | None = None) -> Iterator[dict]:
    """Samples from official files (sorted paths, rows in file order); bad rows skipped + counted."""
    stats = stats if stats is not None else {}
    stats.setdefault("rows", 0)
    stats.setdefault("skipped", 0)
    for path in expand_paths(paths):
        for i, row in enumerate(_rows(path)):
            stats["rows"] += 1
            try:
                yield row_to_sample(row, tokenizer, source=path, index=i, max_len=max_len)
            except Exception as exc:
                stats["skipped"] += 1
                warnings.warn(f"{path}: row {i} skipped ({exc})", stacklevel=2)
