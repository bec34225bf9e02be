"""The worker side of the resumable loader: one logical worker's stream of batches and its state.

What: :class:`WorkerStream` reads its share of every dataset (shard list shuffled identically on all
ranks, split by rank then by logical worker, tar reading by ``webdataset.tarfile_to_samples``), decodes
and validates them a block at a time (:mod:`megasleep.data.block`; either shard format), passes them
through a seeded shuffle buffer, mixes the datasets by weight and batches them (padding, or packing
into rows of ``seq_len``).

Contract: ``state()`` after a batch is plain JSON-able data (per dataset: epoch, shard position,
samples read from the current shard, shuffle-buffer references ``(shard, index)``, counters; the mix
counter; a packed row's leftover); a ``WorkerStream`` built from that state yields exactly the batches
the uninterrupted one would have yielded next. Bad shards and samples are skipped and counted in
``stats``.

Why ours and not ``wds.shuffle`` / ``wds.RandomMix`` / ``wds.split_by_worker``: exact resume needs
every random decision to be a function of a counter kept in the state (a hash of (seed, stream,
counter)), and the shuffle buffer to be restorable from references instead of stored bytes. The
loader's contract and options: docs/data.md ("Loader").
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from megasleep.data.block import expand_raw, sample_count
from megasleep.data.errors import BadDataError, DataError
from megasleep.data.sample import MalformedSample, collate

_MAX_NAMES = 50  # bad shard names kept in the state / error message


# ------------------------------------------------------------------------------------------------
# deterministic randomness: every decision is a hash of (seed, stream, counters)


class _RandStream:
    """``_rand_u64(*prefix, counter)`` with the prefix hashed once (blake2b is incremental: hashing the
    prefix then the counter is hashing their concatenation), for the per-sample decisions."""

    def __init__(self, *prefix: int):
        self._head = hashlib.blake2b(struct.pack(f"<{len(prefix)}q", *[int(k) & 0x7FFFFFFFFFFFFFFF for k in prefix]),
                                     digest_size=8)

    def __call__(self, counter: int) -> int:
        h = self._head.copy()
        h.update((int(counter) & 0x7FFFFFFFFFFFFFFF).to_bytes(8, "little"))
        return int.from_bytes(h.digest(), "little")


def _rand_u64(*keys: int) -> int:
    """blake2b-64 of the keys packed as little-endian int64 (63 bits each): one decision."""
    return _RandStream(*keys[:-1])(keys[-1])


_SHUFFLE, _MIX, _SHARDS = 1, 2, 3


class WorkerContext:
    """Everything a worker needs, picklable (sent to DataLoader workers)."""

    def __init__(self, cfg: Any, sources: list[dict], rank: int, world_size: int, n_logical: int,
                 pad_id: int, vocab_size: int | None, start_epoch: int):
        self.cfg = cfg  # megasleep.data.loader.LoaderConfig (not imported: the loader imports this module)
        self.sources = sources  # [{"name", "urls", "weight", "counts": {url: n} | None}]
        self.rank, self.world_size, self.n_logical = rank, world_size, n_logical
        self.pad_id, self.vocab_size, self.start_epoch = pad_id, vocab_size, start_epoch


def new_stats() -> dict:
    return {"assigned": 0, "opened": 0, "bad_shards": 0, "bad_shard_names": [], "samples": 0, "bad_samples": 0,
            "bad_examples": []}


def sum_stats(parts: list[dict]) -> dict:
    tot = new_stats()
    for s in parts:
        for k in ("assigned", "opened", "bad_shards", "samples", "bad_samples"):
            tot[k] += s[k]
        for n in s["bad_shard_names"]:
            _note(tot, "bad_shard_names", n)
        for n in s["bad_examples"]:
            _note(tot, "bad_examples", n)
    return tot


def _note(stats: dict, key: str, name: str):
    names = stats[key]
    if name not in names and len(names) < _MAX_NAMES:
        names.append(name)


class _Source:
    """One dataset as seen by one logical worker: epochs -> shards -> samples -> shuffle buffer."""

    def __init__(self, ctx: WorkerContext, idx: int, worker: int, state: dict | None, stats: dict):
        self.ctx, self.idx, self.worker, self.stats = ctx, idx, worker, stats
        src = ctx.sources[idx]
        self.name, self.urls, self.counts = src["name"], src["urls"], src["counts"]
        self.st = state if state is not None else {
            "epoch": ctx.start_epoch, "started": False, "shard_pos": 0, "sample_pos": 0, "buffer": [], "picks": 0,
            "done": False, "good": 0}

    # -- which shards this (rank, worker) reads in an epoch
    def shards(self, epoch: int) -> list[str]:
        import webdataset as wds

        cfg = self.ctx.cfg
        seed = _rand_u64(cfg.seed, _SHARDS, self.idx, epoch) if cfg.shuffle_shards else None
        order = [d["url"] for d in wds.SimpleShardList(self.urls, seed=seed)]
        mine = itertools.islice(order, self.ctx.rank, None, self.ctx.world_size)  # split by node
        return list(itertools.islice(mine, self.worker, None, self.ctx.n_logical))  # split by worker

    def _open(self, url: str, errors: list | None = None) -> Iterator[dict]:
        """Raw samples of one shard via webdataset; read errors are appended to ``errors`` and the
        readable part is kept (webdataset's handler protocol: return True = skip and continue)."""
        import webdataset as wds

        def handler(exn: Exception) -> bool:
            if errors is not None:
                errors.append(f"{type(exn).__name__}: {exn}")
            return True

        yield from wds.tarfile_to_samples(handler=handler)([{"url": url}])

    def _bad_shard(self, url: str, why: str):
        self.stats["bad_shards"] += 1
        _note(self.stats, "bad_shard_names", url)
        if self.ctx.cfg.warn_bad:
            warnings.warn(f"bad shard {url}: {why} (skipped)", stacklevel=3)

    def _read(self, shards: list[str]) -> Iterator[tuple[list[int], tuple]]:
        """``([shard position, sample index in the shard], (key, url, sample or MalformedSample))`` from
        the state's position on; blocks before that position are skipped without being decoded."""
        st, vocab = self.st, self.ctx.vocab_size
        for p in range(st["shard_pos"], len(shards)):
            url = shards[p]
            start = st["sample_pos"] if p == st["shard_pos"] else 0
            st["shard_pos"], st["sample_pos"] = p, start
            if start == 0:
                self.stats["opened"] += 1
            errors: list[str] = []
            n = 0  # samples of this shard read so far (skipped ones included)
            for raw in self._open(url, errors):
                k = sample_count(raw)
                if n + k <= start:
                    n += k
                    continue
                items = expand_raw(raw, vocab)
                for i in range(max(0, start - n), k):
                    st["sample_pos"] = n + i + 1
                    yield [p, n + i], (items[i][0], url, items[i][1])
                n += k
            # one verdict per shard: unreadable, empty, or shorter than its manifest entry
            expected = self.counts.get(url) if self.counts else None
            if errors:
                self._bad_shard(url, f"{errors[0]} ({n} samples read)")
            elif n == 0:
                self._bad_shard(url, "no sample")
            elif expected is not None and n < expected:
                self._bad_shard(url, f"{n} samples, manifest says {expected} (truncated?)")
            st["shard_pos"], st["sample_pos"] = p + 1, 0

    def _restore(self, shards: list[str], refs: list[list[int]]) -> list[tuple]:
        """Re-read the samples the shuffle buffer held at the checkpoint (decoding only their blocks)."""
        want: dict[int, set[int]] = {}
        for p, i in refs:
            want.setdefault(p, set()).add(i)
        got: dict[tuple[int, int], tuple] = {}
        for p, idxs in want.items():
            last, n = max(idxs), 0
            for raw in self._open(shards[p]):
                k = sample_count(raw)
                hits = [i for i in range(n, n + k) if i in idxs]
                if hits:
                    items = expand_raw(raw, self.ctx.vocab_size)
                    for i in hits:
                        got[(p, i)] = (items[i - n][0], shards[p], items[i - n][1])
                n += k
                if n > last:
                    break
        missing = [r for r in refs if tuple(r) not in got]
        if missing:
            raise DataError(f"cannot resume dataset {self.name!r}: shards changed since the checkpoint "
                            f"(missing buffered samples {missing[:4]} in {shards[missing[0][0]]})")
        return [got[tuple(r)] for r in refs]

    def samples(self) -> Iterator[tuple[tuple, int]]:
        """Yield ((key, url, sample or MalformedSample), epoch) in shuffled order; ``self.st`` always describes the position
        right after the last yielded sample."""
        cfg, st = self.ctx.cfg, self.st
        size = max(1, cfg.shuffle_buffer)
        while not st["done"]:
            epoch = st["epoch"]
            shards = self.shards(epoch)
            if not st["started"]:
                st["started"] = True
                self.stats["assigned"] += len(shards)
            pick = _RandStream(cfg.seed, _SHUFFLE, self.ctx.rank, self.worker, self.idx, epoch)
            refs: list[list[int]] = st["buffer"]
            buf = self._restore(shards, refs) if refs else []
            reader = self._read(shards)
            more = True
            while True:
                while more and len(buf) < size:
                    try:
                        ref, item = next(reader)
                    except StopIteration:
                        more = False
                        break
                    refs.append(ref)
                    buf.append(item)
                if not buf:
                    break
                j = pick(st["picks"]) % len(buf)
                st["picks"] += 1
                buf[j], buf[-1] = buf[-1], buf[j]
                refs[j], refs[-1] = refs[-1], refs[j]
                refs.pop()
                yield buf.pop(), epoch
            # end of this worker's share of the epoch
            if not shards:
                st["done"] = True  # fewer shards than ranks x workers: nothing for this worker
            elif st["good"] == 0 and self.stats["bad_shards"] + self.stats["bad_samples"] > 0:
                raise BadDataError(f"dataset {self.name!r}: no valid sample in a whole epoch of rank "
                                   f"{self.ctx.rank} worker {self.worker}; bad shards: "
                                   f"{self.stats['bad_shard_names']}; examples: {self.stats['bad_examples'][:3]}")
            elif st["good"] == 0:
                st["done"] = True
            elif cfg.epochs is not None and epoch + 1 >= self.ctx.start_epoch + cfg.epochs:
                st["done"] = True
            if not st["done"]:
                st.update(epoch=epoch + 1, started=False, shard_pos=0, sample_pos=0, buffer=[], picks=0, good=0)


class WorkerStream:
    """One logical worker: mixes its sources, decodes, validates and batches."""

    def __init__(self, ctx: WorkerContext, worker: int, state: dict | None):
        self.ctx, self.worker = ctx, worker
        state = copy.deepcopy(state) if state is not None else None
        self.stats = state["stats"] if state else new_stats()
        self.mix_picks = state["mix_picks"] if state else 0
        self.leftover = state.get("leftover") if state else None
        self.sources = [
            _Source(ctx, i, worker, state["sources"][i] if state else None, self.stats) for i in range(len(ctx.sources))
        ]
        self.finished = bool(state and state.get("finished"))

    def state(self) -> dict:
        # taken after every batch, so no deepcopy: buffer refs and leftover arrays are never mutated
        # in place (refs are swapped / popped as whole items), copying the lists is enough
        stats = {k: (list(v) if isinstance(v, list) else v) for k, v in self.stats.items()}
        return {"sources": [{**s.st, "buffer": list(s.st["buffer"])} for s in self.sources],
                "mix_picks": self.mix_picks, "stats": stats, "leftover": self.leftover, "finished": self.finished}

    def _samples(self) -> Iterator[dict]:
        cfg = self.ctx.cfg
        gens = [s.samples() for s in self.sources]
        active = [not s.st["done"] for s in self.sources]
        weights = np.array([s["weight"] for s in self.ctx.sources], dtype=np.float64)
        mix = _RandStream(cfg.seed, _MIX, self.ctx.rank, self.worker)
        while any(active):
            if len(gens) == 1:
                i = 0
            else:
                w = np.where(active, weights, 0.0)
                u = mix(self.mix_picks) / 2.0**64
                self.mix_picks += 1
                i = int(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right"))
                i = min(i, len(gens) - 1)
            try:
                (key, url, s), epoch = next(gens[i])
            except StopIteration:
                active[i] = False
                continue
            src = self.sources[i]
            self.stats["samples"] += 1
            if not isinstance(s, MalformedSample) and not cfg.pack and cfg.seq_len is not None \
                    and s["input_ids"].size > cfg.seq_len:
                s = MalformedSample(f"sample {key!r} has {s['input_ids'].size} tokens > seq_len={cfg.seq_len} "
                                    "(set pack=True or a larger seq_len)")
            if isinstance(s, MalformedSample):
                self.stats["bad_samples"] += 1
                _note(self.stats, "bad_examples", f"{url}: {s}"[:300])
                _note(self.stats, "bad_shard_names", str(url))
                if cfg.warn_bad:
                    warnings.warn(f"bad sample in {url}: {s} (skipped)", stacklevel=2)
                continue
            src.st["good"] += 1
            s["meta"].update(_key=key, _url=url, _epoch=epoch, _dataset=src.name)
            yield s

    def batches(self) -> Iterator[tuple[dict | None, dict]]:
        """Yield (numpy batch, state after it); at the end of a finite stream without a trailing batch,
        (None, final state): shards read after the last batch still reach the bad-data check."""
        if self.finished:
            return
        cfg = self.ctx.cfg
        rows = self._packed_rows() if cfg.pack else self._samples()
        batch: list[dict] = []
        for s in rows:
            batch.append(s)
            if len(batch) == cfg.batch_size:
                yield self._collate(batch), self.state()
                batch = []
        self.finished = True
        yield (self._collate(batch) if batch and not cfg.drop_last else None), self.state()

    def _packed_rows(self) -> Iterator[dict]:
        """Fill rows of exactly seq_len tokens; a sample that does not fit continues in the next row
        (its remainder is kept in the state as ``leftover``)."""
        T = self.ctx.cfg.seq_len
        samples = self._samples()
        row: list[tuple[dict, int]] = []  # (piece, offset)
        used = 0
        while True:
            if self.leftover is not None:
                piece = {k: (np.asarray(v, dtype=np.int32 if k != "loss_mask" else np.uint8) if k != "meta" else v)
                         for k, v in self.leftover.items()}
                self.leftover = None
            else:
                piece = next(samples, None)
                if piece is None:
                    break
            n = piece["input_ids"].size
            take = min(n, T - used)
            if take < n:  # split: the rest opens the next row (position 0 of a row is never a target)
                rest_starts = [0] + [int(p) - take for p in piece["doc_starts"] if p > take]
                rest_mask = piece["loss_mask"][take:].copy()
                rest_mask[0] = 0
                self.leftover = {"input_ids": piece["input_ids"][take:].tolist(), "loss_mask": rest_mask.tolist(),
                                 "doc_starts": rest_starts, "meta": piece["meta"]}
                piece = {"input_ids": piece["input_ids"][:take], "loss_mask": piece["loss_mask"][:take],
                         "doc_starts": piece["doc_starts"][piece["doc_starts"] < take], "meta": piece["meta"]}
            row.append((piece, used))
            used += take
            if used == T:
                yield self._join(row)
                row, used = [], 0
        if row:
            yield self._join(row)

    @staticmethod
    def _join(row: list[tuple[dict, int]]) -> dict:
        ids = np.concatenate([p["input_ids"] for p, _ in row]).astype(np.int32)
        mask = np.concatenate([p["loss_mask"] for p, _ in row]).astype(np.uint8)
        mask[0] = 0
        starts = np.concatenate([np.asarray(p["doc_starts"], dtype=np.int64) + off for p, off in row])
        starts = np.unique(np.concatenate([[0], starts, [off for _, off in row]]))
        meta = {"task": row[0][0]["meta"].get("task"), "packed": [
            {"offset": off, "length": int(p["input_ids"].size), "_key": p["meta"].get("_key"),
             "_epoch": p["meta"].get("_epoch"), "_dataset": p["meta"].get("_dataset")} for p, off in row]}
        return {"input_ids": ids, "loss_mask": mask, "doc_starts": starts, "meta": meta}

    def _collate(self, batch: list[dict]) -> dict:
        return collate(batch, self.ctx.pad_id, self.ctx.cfg.seq_len)
