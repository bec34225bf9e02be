"""How a shard is written: byte-identical WebDataset tars and the per-shard counts of the manifest.

What: the tar settings (``TAR_KW``: ``mtime=0``, fixed owner and mode), a gzip stream with a fixed
header, :class:`CountingShardWriter` (``webdataset.ShardWriter`` writing blocks of samples
(:mod:`megasleep.data.block`), a new shard every ``shard_size`` samples, plus the sample / token /
target counts of every finished shard), and the small helpers the dataset builders of
:mod:`megasleep.data.shards` share (an ordered bounded pool map, the manifest's totals, progress).

Contract: the same samples give the same bytes (the manifest records every shard's sha256, so a
rebuild can be checked against it); a shard is complete when its manifest record exists. Why fixed
headers: ``tarfile`` stamps the current time by default, which would make every rebuild differ.
Formats: docs/data.md.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from megasleep.data.block import BlockWriter, block_layout
from megasleep.data.manifest import shard_record

SHARD_PATTERN = "shard-%06d.tar"
GZ_PATTERN = "shard-%06d.tar.gz"
# mtime must be an int: a float makes tarfile write a PAX header per member (1 KiB + slow reads)
TAR_KW = dict(mtime=0, user="megasleep", group="megasleep", mode=0o444, encoder=False)


def tokenizer_and_totals(tok, shard_records: list[dict]) -> dict:
    """Manifest fields every dataset kind shares: the tokenizer's identity, the summed counts and the
    block limits its shards were cut with (every writer goes through :class:`BlockWriter`)."""
    return {
        "tokenizer": {**tok.info(), "path": str(tok.path)},
        "block": block_layout(),
        "num_samples": sum(r["samples"] for r in shard_records),
        "num_tokens": sum(r["tokens"] for r in shard_records),
        "num_target_tokens": sum(r["targets"] for r in shard_records),
        "num_samples_without_targets": sum(r["no_target"] for r in shard_records),
    }


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


class GzipFile:
    """A gzip stream with a fixed header (mtime 0, no name), so compressed shards are byte-identical
    across runs (``tarfile``'s own ``w|gz`` stamps the current time). Closing closes the file."""

    def __init__(self, path: str):
        import gzip

        self.raw = open(path, "wb")
        self.gz = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw, mtime=0, compresslevel=6)

    def write(self, b):
        return self.gz.write(b)

    def close(self):
        self.gz.close()
        self.raw.close()


def clean_shards(out: Path):
    """A rebuild must not leave stale shards behind."""
    for old in [*out.glob("shard-*.tar"), *out.glob("shard-*.tar.gz")]:
        old.unlink()


def sample_digest(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int32).tobytes(), digest_size=8).digest()


def chunks(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= n:
            yield buf
            buf = []
    if buf:
        yield buf


def ordered_map(pool, fn, jobs: Iterable[tuple], window: int) -> Iterator[tuple]:
    """``(fn(arg), tag)`` for ``(arg, tag)`` in ``jobs``, in order, with at most ``window`` in flight
    (``Executor.map`` would submit the whole corpus at once)."""
    from collections import deque

    inflight: deque = deque()
    for arg, tag in jobs:
        inflight.append((pool.submit(fn, arg), tag))
        if len(inflight) >= window:
            f, t = inflight.popleft()
            yield f.result(), t
    while inflight:
        f, t = inflight.popleft()
        yield f.result(), t


class CountingShardWriter:
    """ShardWriter of blocks plus per-shard sample / token counts for the manifest.

    A shard holds ``shard_size`` samples (the last one fewer); blocks never span two shards."""

    def __init__(self, out: Path, shard_size: int, compress: bool = False):
        import webdataset as wds

        self.out = out
        self.shard_size = shard_size
        self.records: list[dict] = []
        self._count = self._tokens = self._targets = self._no_target = 0
        self._gz: dict[str, GzipFile] = {}

        def opener(fname: str):
            self._gz[fname] = GzipFile(fname)
            return self._gz[fname]

        def post(fname: str):  # ShardWriter closed the tar stream; close the gzip stream under it
            gz = self._gz.pop(fname, None)
            if gz is not None:
                gz.close()
            self._finish(fname)

        pattern = GZ_PATTERN if compress else SHARD_PATTERN
        # shards are cut here, by samples: ShardWriter's own limits would count blocks and could cut
        # a shard while a block is still filling (its counts would then be wrong)
        self.sw = wds.ShardWriter(str(out / pattern), maxcount=1 << 62, maxsize=float("inf"), verbose=0, post=post,
                                  opener=opener if compress else None, **TAR_KW)
        self.blocks = BlockWriter(self.sw.write)

    def _finish(self, fname: str):
        if self._count:
            self.records.append(shard_record(fname, self._count, self._tokens, targets=self._targets,
                                             no_target=self._no_target))
        else:
            Path(fname).unlink(missing_ok=True)
        self._count = self._tokens = self._targets = self._no_target = 0

    def write(self, sample: dict, key: str):
        if self._count >= self.shard_size:
            self.sw.next_stream()  # closes the full shard (post) and opens the next
        self.blocks.add(sample, key)
        self._count += 1
        self._tokens += int(sample["input_ids"].size)
        n_targets = int(sample["loss_mask"].sum())
        self._targets += n_targets
        self._no_target += n_targets == 0
        if self._count >= self.shard_size:
            self.blocks.flush()  # the shard is full: its last block ends here

    def close(self) -> list[dict]:
        self.blocks.flush()
        self.sw.close()
        return self.records
