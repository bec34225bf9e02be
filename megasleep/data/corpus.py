"""Read documents from text corpora: jsonl (optionally .gz), json (a list of records), txt, parquet.

``iter_documents(paths, text_field="text")`` yields :class:`Document` records in a deterministic
order (paths sorted after glob expansion, rows in file order). A record whose text field is missing
or not a string is skipped with a warning and counted in the returned reader's ``skipped``.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megasleep.data.errors import MissingShardError

TEXT_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".txt", ".txt.gz", ".parquet")


@dataclass
class Document:
    text: str
    source: str
    index: int  # row / line / paragraph index inside ``source``
    record: dict | None = None  # the whole row (jsonl/json/parquet), for importers that need more fields


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand globs and directories (every corpus file under them) into a sorted, de-duplicated list.

    Raises :class:`MissingShardError` naming the pattern when a glob matches nothing or a path is
    missing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        s = str(p)
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise MissingShardError(f"no file matches {s!r}")
            out.extend(hits)
        elif Path(s).is_dir():
            hits = sorted(str(q) for q in Path(s).rglob("*") if q.is_file() and str(q).endswith(TEXT_SUFFIXES))
            if not hits:
                raise MissingShardError(f"directory {s!r} holds no corpus file ({', '.join(TEXT_SUFFIXES)})")
            out.extend(hits)
        elif Path(s).exists():
            out.append(s)
        else:
            raise MissingShardError(f"corpus file not found: {s}")
    return list(dict.fromkeys(out))


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _rows(path: str) -> Iterator[dict]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    elif path.endswith((".jsonl", ".jsonl.gz")):
        with _open_text(path) as f:
            for lineno, line in enumerate(f):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    warnings.warn(f"{path}:{lineno + 1}: skipping malformed JSON line ({exc})", stacklevel=2)
                    yield {}
    elif path.endswith(".json"):
        with _open_text(path) as f:
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} or a single record
            data = data.get("data", [data])
        yield from data
    else:
        raise ValueError(f"not a row-based corpus file: {path}")


def iter_documents(
    paths,
    text_field: str = "text",
    txt_mode: str = "file",
    stats: dict | None = None,
) -> Iterator[Document]:
    """Yield documents from ``paths`` (see :func:`expand_paths`).

    ``text_field``: field of jsonl/json/parquet rows; dotted for nested records (``"meta.body"``).
    ``txt_mode``: ``"file"`` (a .txt file is one document), ``"paragraph"`` (blank-line separated)
    or ``"line"``. ``stats`` (optional dict) receives ``documents`` and ``skipped`` counts.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("documents", 0)
    stats.setdefault("skipped", 0)
    for path in expand_paths(paths):
        if path.endswith((".txt", ".txt.gz")):
            with _open_text(path) as f:
                text = f.read()
            if txt_mode == "file":
                parts = [text]
            elif txt_mode == "paragraph":
                parts = [p for p in text.split("\n\n") if p.strip()]
            elif txt_mode == "line":
                parts = [p for p in text.split("\n") if p.strip()]
            else:
                raise ValueError(f"txt_mode must be file|paragraph|line, got {txt_mode!r}")
            for i, part in enumerate(parts):
                stats["documents"] += 1
                yield Document(part, path, i)
            continue
        for i, row in enumerate(_rows(path)):
            value = row
            for part in text_field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if not isinstance(value, str):
                stats["skipped"] += 1
                warnings.warn(f"{path}: row {i} has no string field {text_field!r}; skipped", stacklevel=2)
                continue
            stats["documents"] += 1
            yield Document(value, path, i, row)
