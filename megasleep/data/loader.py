"""Resumable WebDataset loader: split by rank and worker, seeded shuffle, weighted mixing, padding or
packing, bad-data accounting, exact resume.

Usage::

    from megasleep.data.loader import build_loader
    loader = build_loader({"datasets": ["data/rule110/train"], "batch_size": 64, "seed": 0},
                          rank=rank, world_size=world_size)
    loader.load_state_dict(ckpt["data"])          # optional: resume exactly
    for batch in loader:                          # dict(input_ids, loss_mask, doc_ids, meta)
        ...
        ckpt["data"] = loader.state_dict()        # the samples consumed so far, nothing prefetched

How one epoch of one dataset is read (every rank does the same, with its own ``rank``):

1. the dataset's shard list is shuffled with a seed derived from (``seed``, dataset, epoch) —
   identical on all ranks — using ``webdataset.SimpleShardList``;
2. rank ``r`` takes shards ``r::world_size``; logical worker ``w`` takes every ``num_workers``-th
   of those;
3. each shard is read with ``webdataset.tarfile_to_samples`` (local paths and every URL scheme
   webdataset's ``gopen`` knows: ``pipe:``, ``http(s)://``, ``hf://``, ...), errors go to a counting
   handler;
4. samples pass a seeded shuffle buffer, are decoded and validated (:mod:`megasleep.data.sample`),
   mixed with the other datasets by weight, and batched (right padding, or packing into rows).

Why the worker loop, shuffle buffer and mixing are ours and not ``wds.shuffle`` / ``wds.RandomMix``
/ ``wds.split_by_worker``: exact resume needs every random decision to be a function of a counter
kept in the state (ours hash (seed, stream, counter)), the buffer's content to be restorable (we
keep references ``(shard, index)`` and re-read those samples on resume instead of storing their
bytes), and the worker that produces a batch to be known to the main process (a resumed run
re-maps DataLoader worker ids so that the round-robin continues with the right worker). The tar
reading itself is webdataset's.

State (``state_dict()``): per logical worker and dataset ``epoch``, position in its shard list,
samples read from the current shard, shuffle-buffer references, counters; plus which worker is
next. Each batch carries its worker's state; the main process keeps the state of the last batch it
*handed out*, so prefetched batches are not counted.

Bad data: a shard that cannot be opened or read, is empty or holds fewer samples
than its manifest says, and a sample with missing / malformed fields are skipped with a warning
and counted. When bad shards exceed ``max_bad_fraction`` of the shards assigned so far, or (after
``min_samples_for_bad_check`` samples) bad samples exceed that fraction of samples read, iteration
stops with :class:`BadDataError` naming the shards. Missing shards, empty globs and tokenizer-hash
mismatches fail in :func:`build_loader`, before any training step.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import struct
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from megasleep.data.errors import BadDataError, DataError, TokenizerMismatchError
from megasleep.data.manifest import check_tokenizer_hash, manifest_tokenizer_hash, resolve_shards
from megasleep.data.sample import MalformedSample, collate, decode_sample

STATE_VERSION = 1
_MAX_NAMES = 50  # bad shard names kept in the state / error message


class DatasetSpec(BaseModel):
    """One dataset of the mixture: ``path`` (see :func:`megasleep.data.manifest.resolve_shards`)."""

    model_config = ConfigDict(extra="forbid")
    path: str | list[str]
    weight: float = Field(1.0, gt=0)
    name: str | None = None


class LoaderConfig(BaseModel):
    """Loader settings. ``datasets`` also accepts a string or a list of strings."""

    model_config = ConfigDict(extra="forbid")
    datasets: list[DatasetSpec]
    batch_size: int = Field(8, ge=1)
    seq_len: int | None = Field(None, ge=2)  # pad every batch to seq_len (required with pack)
    pack: bool = False  # concatenate samples into rows of seq_len (text); samples may be split
    pad_id: int | None = None  # default: the manifest's tokenizer pad id, else 0
    shuffle_buffer: int = Field(1000, ge=0)  # 0: no sample shuffle
    shuffle_shards: bool = True
    seed: int = 0
    epochs: int | None = Field(None, ge=1)  # None: repeat forever (training)
    num_workers: int = Field(2, ge=0)
    prefetch_factor: int = Field(2, ge=1)
    drop_last: bool = False  # drop a final partial batch (finite epochs only)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    min_samples_for_bad_check: int = Field(100, ge=1)
    tokenizer_hash: str | None = None  # the model's tokenizer; mismatching manifests fail early
    vocab_size: int | None = None  # validate ids (default: from the manifest)
    pin_memory: bool = False
    warn_bad: bool = True

    @field_validator("datasets", mode="before")
    @classmethod
    def _coerce(cls, v):
        if isinstance(v, (str, dict, DatasetSpec)):
            v = [v]
        return [DatasetSpec(path=x) if isinstance(x, str) else x for x in v]


# ------------------------------------------------------------------------------------------------
# deterministic randomness: every decision is a hash of (seed, stream, counters)


def _rand_u64(*keys: int) -> int:
    data = struct.pack(f"<{len(keys)}q", *[int(k) & 0x7FFFFFFFFFFFFFFF for k in keys])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


_SHUFFLE, _MIX, _SHARDS = 1, 2, 3


# ------------------------------------------------------------------------------------------------
# worker side


class _Ctx:
    """Everything a worker needs, picklable (sent to DataLoader workers)."""

    def __init__(self, cfg: LoaderConfig, sources: list[dict], rank: int, world_size: int, n_logical: int,
                 pad_id: int, vocab_size: int | None, start_epoch: int):
        self.cfg = cfg
        self.sources = sources  # [{"name", "urls", "weight", "counts": {url: n} | None}]
        self.rank, self.world_size, self.n_logical = rank, world_size, n_logical
        self.pad_id, self.vocab_size, self.start_epoch = pad_id, vocab_size, start_epoch


def _new_stats() -> dict:
    return {"assigned": 0, "opened": 0, "bad_shards": 0, "bad_shard_names": [], "samples": 0, "bad_samples": 0,
            "bad_examples": []}


def _sum_stats(parts: list[dict]) -> dict:
    tot = _new_stats()
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

    def __init__(self, ctx: _Ctx, idx: int, worker: int, state: dict | None, stats: dict):
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

    def _read(self, shards: list[str]) -> Iterator[tuple[list[int], dict]]:
        st = self.st
        for p in range(st["shard_pos"], len(shards)):
            url = shards[p]
            start = st["sample_pos"] if p == st["shard_pos"] else 0
            st["shard_pos"], st["sample_pos"] = p, start
            if start == 0:
                self.stats["opened"] += 1
            errors: list[str] = []
            n = start
            for raw in itertools.islice(self._open(url, errors), start, None):
                n += 1
                st["sample_pos"] = n
                yield [p, n - 1], raw
            # one verdict per shard: unreadable, empty, or shorter than its manifest entry
            expected = self.counts.get(url) if self.counts else None
            if errors:
                self._bad_shard(url, f"{errors[0]} ({n} samples read)")
            elif n == 0:
                self._bad_shard(url, "no sample")
            elif expected is not None and n < expected:
                self._bad_shard(url, f"{n} samples, manifest says {expected} (truncated?)")
            st["shard_pos"], st["sample_pos"] = p + 1, 0

    def _restore(self, shards: list[str], refs: list[list[int]]) -> list[dict]:
        """Re-read the samples the shuffle buffer held at the checkpoint."""
        want: dict[int, set[int]] = {}
        for p, i in refs:
            want.setdefault(p, set()).add(i)
        got: dict[tuple[int, int], dict] = {}
        for p, idxs in want.items():
            last = max(idxs)
            for i, raw in enumerate(self._open(shards[p])):
                if i in idxs:
                    got[(p, i)] = raw
                if i >= last:
                    break
        missing = [r for r in refs if tuple(r) not in got]
        if missing:
            raise DataError(f"cannot resume dataset {self.name!r}: shards changed since the checkpoint "
                            f"(missing buffered samples {missing[:4]} in {shards[missing[0][0]]})")
        return [got[tuple(r)] for r in refs]

    def samples(self) -> Iterator[tuple[dict, int]]:
        """Yield (raw sample, epoch) in shuffled order; ``self.st`` always describes the position
        right after the last yielded sample."""
        cfg, st = self.ctx.cfg, self.st
        size = max(1, cfg.shuffle_buffer)
        while not st["done"]:
            epoch = st["epoch"]
            shards = self.shards(epoch)
            if not st["started"]:
                st["started"] = True
                self.stats["assigned"] += len(shards)
            refs: list[list[int]] = st["buffer"]
            buf = self._restore(shards, refs) if refs else []
            reader = self._read(shards)
            more = True
            while True:
                while more and len(buf) < size:
                    try:
                        ref, raw = next(reader)
                    except StopIteration:
                        more = False
                        break
                    refs.append(ref)
                    buf.append(raw)
                if not buf:
                    break
                j = _rand_u64(cfg.seed, _SHUFFLE, self.ctx.rank, self.worker, self.idx, epoch, st["picks"]) % len(buf)
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


class _WorkerStream:
    """One logical worker: mixes its sources, decodes, validates and batches."""

    def __init__(self, ctx: _Ctx, worker: int, state: dict | None):
        self.ctx, self.worker = ctx, worker
        state = copy.deepcopy(state) if state is not None else None
        self.stats = state["stats"] if state else _new_stats()
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
        while any(active):
            if len(gens) == 1:
                i = 0
            else:
                w = np.where(active, weights, 0.0)
                u = _rand_u64(cfg.seed, _MIX, self.ctx.rank, self.worker, self.mix_picks) / 2.0**64
                self.mix_picks += 1
                i = int(np.searchsorted(np.cumsum(w) / w.sum(), u, side="right"))
                i = min(i, len(gens) - 1)
            try:
                raw, epoch = next(gens[i])
            except StopIteration:
                active[i] = False
                continue
            src = self.sources[i]
            self.stats["samples"] += 1
            try:
                s = decode_sample(raw, self.ctx.vocab_size)
                if not cfg.pack and cfg.seq_len is not None and s["input_ids"].size > cfg.seq_len:
                    raise MalformedSample(f"sample {raw.get('__key__')!r} has {s['input_ids'].size} tokens "
                                          f"> seq_len={cfg.seq_len} (set pack=True or a larger seq_len)")
            except MalformedSample as exc:
                self.stats["bad_samples"] += 1
                _note(self.stats, "bad_examples", f"{raw.get('__url__')}: {exc}"[:300])
                _note(self.stats, "bad_shard_names", str(raw.get("__url__")))
                if cfg.warn_bad:
                    warnings.warn(f"bad sample in {raw.get('__url__')}: {exc} (skipped)", stacklevel=2)
                continue
            src.st["good"] += 1
            s["meta"].update(_key=raw["__key__"], _url=raw.get("__url__"), _epoch=epoch, _dataset=src.name)
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


def _to_torch(batch: dict) -> dict:
    import torch

    return {"input_ids": torch.from_numpy(batch["input_ids"]), "loss_mask": torch.from_numpy(batch["loss_mask"]),
            "doc_ids": torch.from_numpy(batch["doc_ids"]), "meta": batch["meta"]}


def _identity(x):
    return x


class _LoaderDataset:
    """The IterableDataset handed to torch's DataLoader (built lazily: torch is imported here)."""

    def __init__(self, ctx: _Ctx, worker_states: list, offset: int):
        self.ctx, self.worker_states, self.offset = ctx, worker_states, offset

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        torch_id = info.id if info is not None else 0
        logical = (torch_id + self.offset) % self.ctx.n_logical
        stream = _WorkerStream(self.ctx, logical, self.worker_states[logical])
        for batch, state in stream.batches():
            out = _to_torch(batch) if batch is not None else {}
            out["_state"] = {"worker": logical, "state": state}
            yield out


_TORCH_DS = None


def _torch_dataset_class():
    """``_LoaderDataset`` as a ``torch.utils.data.IterableDataset`` (created on first use so that
    importing this module does not import torch; reachable as ``loader.MegasleepWebDataset`` so
    that spawn-started workers can unpickle it)."""
    global _TORCH_DS
    if _TORCH_DS is None:
        import torch.utils.data

        class MegasleepWebDataset(_LoaderDataset, torch.utils.data.IterableDataset):
            pass

        MegasleepWebDataset.__module__ = __name__
        MegasleepWebDataset.__qualname__ = "MegasleepWebDataset"
        _TORCH_DS = MegasleepWebDataset
    return _TORCH_DS


def __getattr__(name: str):
    if name == "MegasleepWebDataset":
        return _torch_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------------
# main process


class ResumableLoader:
    """Iterable of batches with ``state_dict()`` / ``load_state_dict()`` for exact resume.

    Iterating again continues from the current state; after a finite run (``epochs``) ends, the
    next iteration starts the following epochs (new shuffles). ``stats()`` sums the bad-data
    counters of this rank's workers as seen so far.
    """

    def __init__(self, cfg: LoaderConfig, sources: list[dict], rank: int, world_size: int, pad_id: int,
                 vocab_size: int | None, manifests: list[dict | None]):
        self.cfg, self.sources, self.rank, self.world_size = cfg, sources, rank, world_size
        self.pad_id, self.vocab_size, self.manifests = pad_id, vocab_size, manifests
        self.n_logical = max(1, cfg.num_workers)
        self._state = self._fresh(0)
        self._finished_stats: list[dict] = []  # counters of finite runs this loader completed

    # -- state
    def _fingerprint(self) -> str:
        c = self.cfg
        key = {"sources": [[s["name"], s["urls"], s["weight"]] for s in self.sources], "seed": c.seed,
               "batch_size": c.batch_size, "seq_len": c.seq_len, "pack": c.pack, "shuffle_buffer": c.shuffle_buffer,
               "shuffle_shards": c.shuffle_shards, "epochs": c.epochs, "drop_last": c.drop_last}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def _fresh(self, start_epoch: int) -> dict:
        return {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.n_logical, "start_epoch": start_epoch,
                "next_worker": 0, "batches": 0, "workers": [None] * self.n_logical}

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        for key, mine in (("world_size", self.world_size), ("num_workers", self.n_logical), ("rank", self.rank)):
            if state.get(key) != mine:
                raise ValueError(f"loader state was saved with {key}={state.get(key)}, this loader has {mine}: "
                                 "exact resume needs the same ranks and workers")
        if strict and state.get("fingerprint") != self._fingerprint():
            raise ValueError("loader state was saved for a different data config (datasets, seed, batch size, "
                             "seq_len, shuffle, epochs); pass strict=False to load it anyway")
        self._state = copy.deepcopy(state)

    def stats(self) -> dict:
        """Bad-data counters of this rank: the finite runs completed so far plus the current one."""
        return _sum_stats([*self._finished_stats, *(w["stats"] for w in self._state["workers"] if w is not None)])

    def _check_bad(self):
        f = self.cfg.max_bad_fraction
        s = self.stats()
        too_many_shards = s["bad_shards"] > f * max(1, s["assigned"])
        too_many_samples = s["samples"] >= self.cfg.min_samples_for_bad_check and s["bad_samples"] > f * s["samples"]
        if too_many_shards or too_many_samples:
            raise BadDataError(
                f"too much bad data on rank {self.rank}: {s['bad_shards']} bad shards of {s['assigned']} assigned, "
                f"{s['bad_samples']} bad samples of {s['samples']} read (max_bad_fraction={f}); "
                f"shards: {s['bad_shard_names']}; examples: {s['bad_examples'][:3]}")

    # -- iteration
    def __iter__(self) -> Iterator[dict]:
        st = self._state
        ctx = _Ctx(self.cfg, self.sources, self.rank, self.world_size, self.n_logical, self.pad_id, self.vocab_size,
                   st["start_epoch"])
        if self.cfg.num_workers == 0:
            ds = _LoaderDataset(ctx, st["workers"], st["next_worker"])
            it = iter(ds)
            dl = None
        else:
            import torch.utils.data

            dl = torch.utils.data.DataLoader(
                _torch_dataset_class()(ctx, st["workers"], st["next_worker"]), batch_size=None,
                num_workers=self.cfg.num_workers, prefetch_factor=self.cfg.prefetch_factor, collate_fn=_identity,
                pin_memory=self.cfg.pin_memory, persistent_workers=False)
            it = iter(dl)
        try:
            for item in it:
                info = item.pop("_state")
                st["workers"][info["worker"]] = info["state"]
                st["next_worker"] = (info["worker"] + 1) % self.n_logical
                self._check_bad()
                if not item:  # a worker's final state, no batch
                    continue
                st["batches"] += 1
                yield item
        finally:
            del it, dl
        # a finite run ended: the next iteration starts the following epochs; its counters stay in stats()
        self._finished_stats.append(_sum_stats([w["stats"] for w in st["workers"] if w is not None]))
        self._state = self._fresh(st["start_epoch"] + (self.cfg.epochs or 0))


def build_loader(cfg: LoaderConfig | dict, rank: int = 0, world_size: int = 1) -> ResumableLoader:
    """Validate the datasets (fails early: missing shard, empty glob, tokenizer mismatch) and
    return a :class:`ResumableLoader` for this rank."""
    if not isinstance(cfg, LoaderConfig):
        cfg = LoaderConfig.model_validate(cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if cfg.pack and cfg.seq_len is None:
        raise ValueError("pack=True needs seq_len")
    sources, manifests = [], []
    hashes: dict[str, str] = {}
    for ds in cfg.datasets:
        urls, manifest = resolve_shards(ds.path, max_bad_fraction=cfg.max_bad_fraction)  # damaged shards: its budget
        name = ds.name or (manifest.get("_dir") if manifest else str(ds.path))
        if manifest is not None:
            check_tokenizer_hash(manifest, cfg.tokenizer_hash)
            h = manifest_tokenizer_hash(manifest)
            if h is not None:
                hashes[name] = h
        elif cfg.tokenizer_hash is not None:
            warnings.warn(f"dataset {name!r} has no manifest: its tokenizer hash cannot be checked", stacklevel=2)
        counts = None
        if manifest is not None:
            from pathlib import Path

            base = Path(manifest["_dir"])
            counts = {str(base / sh["name"]): sh["samples"] for sh in manifest["shards"]}
        n_rank = len(urls[rank::world_size])
        if n_rank == 0:
            raise DataError(f"dataset {name!r} has {len(urls)} shards, fewer than world_size={world_size}: "
                            f"rank {rank} would get no data; write more (smaller) shards")
        if n_rank < max(1, cfg.num_workers):
            warnings.warn(f"dataset {name!r}: rank {rank} gets {n_rank} shards for {cfg.num_workers} workers; "
                          "some workers will idle", stacklevel=2)
        sources.append({"name": name, "urls": urls, "weight": ds.weight, "counts": counts})
        manifests.append(manifest)
    if len(set(hashes.values())) > 1:
        raise TokenizerMismatchError(f"datasets were tokenized with different tokenizers: {hashes}")
    toks = [m.get("tokenizer") or {} for m in manifests if m]
    pad_id = cfg.pad_id if cfg.pad_id is not None else next((t["pad_id"] for t in toks if "pad_id" in t), 0)
    vocab = cfg.vocab_size if cfg.vocab_size is not None else next(
        (t["vocab_size"] for t in toks if "vocab_size" in t), None)
    return ResumableLoader(cfg, sources, rank, world_size, pad_id, vocab, manifests)


def loader_state_summary(state: dict[str, Any]) -> str:
    """One line for logs: batches consumed, epochs per worker."""
    eps = [[s["epoch"] for s in w["sources"]] if w else None for w in state["workers"]]
    return f"batches={state['batches']} next_worker={state['next_worker']} epochs={eps}"
