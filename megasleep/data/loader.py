"""Resumable WebDataset loader: split by rank and worker, seeded shuffle, weighted mixing, padding or
packing, bad-data accounting, exact resume.

    loader = build_loader({"datasets": ["data/rule110/train"], "batch_size": 64, "seed": 0},
                          rank=rank, world_size=world_size)
    loader.load_state_dict(ckpt["data"])          # optional: resume exactly
    for batch in loader:                          # dict(input_ids, loss_mask, doc_ids, meta)
        ckpt["data"] = loader.state_dict()        # the samples consumed so far, nothing prefetched

Contract: ``state_dict()`` is JSON-able and counts only the batches handed out; a loader given it back
yields what the uninterrupted one would have yielded next. Missing shards, empty globs and tokenizer
mismatches fail in :func:`build_loader`; bad data past ``max_bad_fraction`` raises :class:`BadDataError`.
How a worker reads, shuffles and mixes, and why that part is ours: :mod:`megasleep.data.worker_stream`.
Doc: docs/data.md ("Loader").
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from megasleep.data.errors import BadDataError, DataError, TokenizerMismatchError
from megasleep.data.manifest import check_tokenizer_hash, manifest_tokenizer_hash, resolve_shards
from megasleep.data.worker_stream import WorkerContext, WorkerStream, sum_stats

STATE_VERSION = 1


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


def _to_torch(batch: dict) -> dict:
    import torch

    return {"input_ids": torch.from_numpy(batch["input_ids"]), "loss_mask": torch.from_numpy(batch["loss_mask"]),
            "doc_ids": torch.from_numpy(batch["doc_ids"]), "meta": batch["meta"]}


def _identity(x):
    return x


class _LoaderDataset:
    """The IterableDataset handed to torch's DataLoader (built lazily: torch is imported here)."""

    def __init__(self, ctx: WorkerContext, worker_states: list, offset: int):
        self.ctx, self.worker_states, self.offset = ctx, worker_states, offset

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        torch_id = info.id if info is not None else 0
        logical = (torch_id + self.offset) % self.ctx.n_logical
        stream = WorkerStream(self.ctx, logical, self.worker_states[logical])
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
        return sum_stats([*self._finished_stats, *(w["stats"] for w in self._state["workers"] if w is not None)])

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
        ctx = WorkerContext(self.cfg, self.sources, self.rank, self.world_size, self.n_logical, self.pad_id, self.vocab_size,
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
        self._finished_stats.append(sum_stats([w["stats"] for w in st["workers"] if w is not None]))
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
