"""Read documents from a corpus: directories, globs and files of any common kind.

Kinds (by file name):

* plain text, one document per file (whole, newlines and indentation kept): ``.txt``, markdown,
  reStructuredText, LaTeX, source code of most languages, config files, and files without a suffix
  that are UTF-8 text (``README``, ``Makefile``); optionally gzipped (``.txt.gz``).
* rows with a text field: ``.jsonl`` (optionally ``.gz``), ``.json`` (a list of records or
  ``{"data": [...]}``), ``.parquet``; through the ``datasets`` library where it is installed, also
  ``.arrow`` files and directories written by ``Dataset.save_to_disk``.

:func:`scan_corpus` expands the inputs into the files that will be read and the files skipped, each
with its reason (binary or unknown kind, cache directory, empty); :func:`iter_documents` yields
:class:`Document` records in a deterministic order (files sorted, rows in file order) and counts what
it read into ``stats``; :func:`corpus_report` turns both into the lines the command-line tools print.
A long file stays one document: the shard builder packs it into long sequences and records where each
document starts.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megasleep.data.errors import MissingShardError

# files read whole as one document each (a ".gz" after any of them is decompressed)
PLAIN_TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .org .adoc .asciidoc .textile .wiki .log .csv .tsv "
    ".py .pyi .pyx .pxd .c .h .cc .cpp .cxx .hh .hpp .hxx .cu .cuh .m .mm .java .kt .kts .scala .groovy "
    ".go .rs .swift .js .jsx .mjs .ts .tsx .rb .php .pl .pm .lua .r .jl .hs .ml .mli .ex .exs .erl "
    ".clj .lisp .el .scm .f .f90 .vb .cs .fs .dart .zig .nim .v .sv .vhd .sql .s .asm "
    ".sh .bash .zsh .fish .csh .ps1 .bat .cmake .mk .in .am .ac "
    ".html .htm .xml .css .scss .svg .yaml .yml .toml .ini .cfg .conf .properties .proto .graphql".split()
)
ROW_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
DATASETS_SUFFIXES = (".arrow",)
# directories a walk does not enter (caches and version control)
SKIP_DIRS = frozenset({"__pycache__", "node_modules", ".git", ".hg", ".svn", ".tox", ".venv", ".mypy_cache"})
_SNIFF_BYTES = 8192


@dataclass
class Document:
    text: str
    source: str
    index: int  # row / paragraph / line index inside ``source`` (0 for a whole file)
    record: dict | None = None  # the whole row (jsonl/json/parquet), for importers that need more fields


@dataclass
class CorpusScan:
    """What :func:`scan_corpus` found: files to read (with their kind) and files skipped, by reason."""

    files: list[tuple[str, str]] = field(default_factory=list)  # (path, "text" | "rows" | "datasets")
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> paths

    def skip(self, reason: str, path: str) -> None:
        self.skipped.setdefault(reason, []).append(path)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.files]


def _is_saved_dataset(d: Path) -> bool:
    return ((d / "dataset_info.json").is_file() and (d / "state.json").is_file()) or (d / "dataset_dict.json").is_file()


def _looks_like_text(path: Path) -> bool:
    """UTF-8 without NUL bytes in the first few KiB (a file with no suffix: README, Makefile, ...)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a character cut at the end of the sniffed bytes is fine
        return exc.start >= len(head) - 3
    return True


def file_kind(path: str | os.PathLike) -> str | None:
    """``"text"``, ``"rows"``, ``"datasets"``, or None (binary / unknown kind)."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "datasets" if _is_saved_dataset(p) else None
    if name.endswith(ROW_SUFFIXES):
        return "rows"
    if name.endswith(DATASETS_SUFFIXES):
        return "datasets"
    stem_suffix = Path(name[:-3]).suffix if name.endswith(".gz") else p.suffix.lower()
    if stem_suffix in PLAIN_TEXT_SUFFIXES:
        return "text"
    if not stem_suffix or name.startswith("."):  # README, Makefile, .bashrc: text if it reads as text
        return "text" if _looks_like_text(p) else None
    return None


def _classify(scan: CorpusScan, path: Path) -> None:
    if path.stat().st_size == 0:
        scan.skip("empty", str(path))
        return
    kind = file_kind(path)
    if kind is None:
        scan.skip("binary or of unknown kind", str(path))
    else:
        scan.files.append((str(path), kind))


def _walk(scan: CorpusScan, root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d in SKIP_DIRS:
                scan.skip("cache or version-control directory", str(here / d) + os.sep)
            elif _is_saved_dataset(here / d):
                scan.files.append((str(here / d), "datasets"))
            else:
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = here / name
            if p.is_file():
                _classify(scan, p)


def scan_corpus(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> CorpusScan:
    """Expand files, globs (``**`` recursive) and directories (walked, caches skipped) into the files
    to read, sorted and de-duplicated, and the files skipped with their reasons.

    Raises :class:`MissingShardError` naming the input when a path is missing, a glob matches
    nothing, or nothing readable is left. A :class:`CorpusScan` is returned as it is.
    """
    if isinstance(paths, CorpusScan):
        return paths
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    scan = CorpusScan()
    for item in paths:
        s = str(item)
        before = len(scan.files)
        if any(c in s for c in "*?["):
            hits = sorted(glob.glob(s, recursive=True))
            if not hits:
                raise MissingShardError(f"corpus input {s!r}: no file matches")
            for h in hits:
                hp = Path(h)
                if hp.is_dir() and _is_saved_dataset(hp):
                    scan.files.append((h, "datasets"))
                elif hp.is_dir():
                    _walk(scan, hp)
                else:
                    _classify(scan, hp)
        elif Path(s).is_dir():
            if _is_saved_dataset(Path(s)):
                scan.files.append((s, "datasets"))
            else:
                _walk(scan, Path(s))
        elif Path(s).is_file():
            _classify(scan, Path(s))
        else:
            raise MissingShardError(f"corpus input not found: {s}")
        if len(scan.files) == before:
            why = "; ".join(f"{len(v)} {k}" for k, v in scan.skipped.items()) or "nothing there"
            raise MissingShardError(f"corpus input {s!r} holds no readable corpus file ({why})")
    seen: dict[str, str] = {}
    for p, k in scan.files:
        seen.setdefault(p, k)
    scan.files = sorted(seen.items())
    return scan


def expand_paths(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The files :func:`scan_corpus` would read, sorted (see there for the errors)."""
    return scan_corpus(paths).paths


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


def _dataset_rows(path: str) -> Iterator[dict]:
    """Rows of an ``.arrow`` file or a ``save_to_disk`` directory, through the ``datasets`` library."""
    try:
        import datasets
    except ImportError:
        raise MissingShardError(f"{path}: reading it needs the `datasets` package (pip install datasets)") from None
    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        parts = [ds[k] for k in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [ds]
    else:
        parts = [datasets.Dataset.from_file(path)]
    for part in parts:
        yield from part


def _split_text(text: str, txt_mode: str) -> list[str]:
    if txt_mode == "file":
        return [text]
    if txt_mode == "paragraph":
        return [p for p in text.split("\n\n") if p.strip()]
    if txt_mode == "line":
        return [p for p in text.split("\n") if p.strip()]
    raise ValueError(f"txt_mode must be file|paragraph|line, got {txt_mode!r}")


def _field(row, text_field: str):
    value = row
    for part in text_field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def iter_documents(
    paths,
    text_field: str = "text",
    txt_mode: str = "file",
    stats: dict | None = None,
) -> Iterator[Document]:
    """Yield documents from ``paths`` (files, globs, directories; see :func:`scan_corpus`).

    ``text_field``: field of row files; dotted for nested records (``"meta.body"``). ``txt_mode``:
    what a document is in a plain-text file: ``"file"`` (default: the whole file, however long),
    ``"paragraph"`` (blank-line separated) or ``"line"``. ``stats`` (optional dict) receives
    ``documents``, ``bytes`` (UTF-8 bytes of the documents), ``files_read``, ``skipped`` (records
    without a string text field), ``skipped_files`` (reason -> paths, from the scan and from reading,
    e.g. not UTF-8) and ``scan`` (the :class:`CorpusScan`).
    """
    if txt_mode not in ("file", "paragraph", "line"):
        raise ValueError(f"txt_mode must be file|paragraph|line, got {txt_mode!r}")
    scan = scan_corpus(paths)
    stats = stats if stats is not None else {}
    for key in ("documents", "bytes", "files_read", "skipped"):
        stats.setdefault(key, 0)
    skipped_files = stats.setdefault("skipped_files", {})
    for reason, ps in scan.skipped.items():
        skipped_files.setdefault(reason, []).extend(ps)
    stats["scan"] = scan

    def emit(text: str, path: str, i: int, row=None) -> Document:
        stats["documents"] += 1
        stats["bytes"] += len(text.encode("utf-8"))
        return Document(text, path, i, row)

    for path, kind in scan.files:
        if kind == "text":
            try:
                with _open_text(path) as f:
                    text = f.read()
            except UnicodeDecodeError:
                skipped_files.setdefault("not UTF-8 text", []).append(path)
                continue
            stats["files_read"] += 1
            for i, part in enumerate(_split_text(text, txt_mode)):
                yield emit(part, path, i)
            continue
        stats["files_read"] += 1
        rows = _rows(path) if kind == "rows" else _dataset_rows(path)
        for i, row in enumerate(rows):
            value = _field(row, text_field)
            if not isinstance(value, str):
                stats["skipped"] += 1
                warnings.warn(f"{path}: row {i} has no string field {text_field!r}; skipped", stacklevel=2)
                continue
            yield emit(value, path, i, row)


def corpus_report(stats: dict, examples: int = 3) -> list[str]:
    """Lines saying what :func:`iter_documents` read and what was skipped and why."""
    scan: CorpusScan | None = stats.get("scan")
    kinds: dict[str, int] = {}
    for _, k in scan.files if scan else []:
        kinds[k] = kinds.get(k, 0) + 1
    lines = [f"corpus: read {stats.get('files_read', 0)} files ("
             + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + f"): {stats.get('documents', 0)} documents, "
             f"{stats.get('bytes', 0):,} bytes of text"]
    for reason, ps in sorted((stats.get("skipped_files") or {}).items()):
        shown = ", ".join(ps[:examples]) + (f", ... ({len(ps) - examples} more)" if len(ps) > examples else "")
        lines.append(f"corpus: skipped {len(ps)} ({reason}): {shown}")
    if stats.get("skipped"):
        lines.append(f"corpus: skipped {stats['skipped']} records without a string text field")
    return lines


def print_report(stats: dict, write: Callable[[str], None] | None = None) -> None:
    """Send :func:`corpus_report` to ``write`` (default: the ``megasleep.data.corpus`` logger at INFO,
    which the command-line tools print on stderr)."""
    import logging

    for line in corpus_report(stats):
        (write or logging.getLogger(__name__).info)(line)
