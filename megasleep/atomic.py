"""Write-then-rename, the one way megasleep writes a file that someone may be reading or that a crash
must not tear (checkpoint markers, ``status.json``, manifests, shards, tokenizers, results).

``atomic_path(path)`` yields a temporary path next to ``path``; when the block ends it fsyncs that file
and renames it over ``path`` (then fsyncs the directory). A crash or a full disk at any point leaves
either the old file or the new one, never a torn one, and no ``.tmp`` behind on errors.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse O_RDONLY on dirs)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield ``path`` + ``suffix`` to write; on success fsync it and rename it over ``path``.
    (Concurrent writers of the same file pass distinct suffixes.)"""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, suffix: str = ".tmp") -> None:
    """Write text or bytes to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, suffix) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
