"""Block shards: one WebDataset sample (one tar key) holding up to K consecutive samples.

Why: a tar member costs ~30 us to parse in Python's ``tarfile`` whatever its size, and the demo's
Rule-110 samples are ~26 tokens, so with four members per sample the loader spent most of its time
in tar headers. A block amortises the headers over K samples and lets decoding and validation run
as numpy operations over the whole block (the same idea as webdataset's pre-batched shards).
Measured numbers: docs/data.md ("Throughput").

A block is five tar members sharing the key of its first sample::

    <key>.input_ids.npy   int32 [sum T]   the samples' token ids, concatenated
    <key>.loss_mask.npy   uint8 [sum T]   their loss masks, concatenated
    <key>.doc_starts.npy  int32 [sum D]   their document starts (each relative to its own sample)
    <key>.lengths.npy     int64 [K, 2]    per sample: (T tokens, D document starts)
    <key>.meta.json       {"keys": [K sample keys], "meta": [K meta dicts]}

A block ends after ``BLOCK_SAMPLES`` samples or once it holds ``BLOCK_TOKENS`` tokens, whichever
comes first, and never spans two shards; a shard's samples are cut into blocks in order. The
one-sample-per-key format of :mod:`megasleep.data.sample` (no ``lengths.npy``) is still read
everywhere: :func:`expand_raw` turns either kind of raw tar sample into in-memory samples, and every
reader of shards (the loader, evaluation, ``megasleep data verify``, the tests) goes through it.

Validation is exactly :func:`megasleep.data.sample.validate_sample`, vectorised: the block-wide numpy
checks only *flag* samples, and every flagged sample is re-checked by the per-sample validator, which
gives the verdict and the message; so a bad sample costs only itself, its neighbours are kept. A
block whose arrays cannot be decoded or do not add up (lengths against array sizes, keys and meta
against K) is bad as a whole: it counts as K bad samples when its ``lengths.npy`` still gives K, else
as one (the count must be a function of the bytes alone, so that sample positions, and thus resume,
stay deterministic; the shard's manifest count then flags the shard as short as well).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np

from megasleep.data.sample import (
    MalformedSample,
    decode_sample,
    meta_bytes,
    meta_problem,
    npy_bytes,
    npy_header,
    npy_load,
    validate_sample,
)

BLOCK_FIELDS = ("input_ids.npy", "loss_mask.npy", "doc_starts.npy", "lengths.npy", "meta.json")
BLOCK_SAMPLES = 64  # samples per block (the last block of a shard may hold fewer)
BLOCK_TOKENS = 1 << 18  # a block also ends once it holds this many tokens (long-text corpora)

Item = tuple[str, "dict | MalformedSample"]  # (sample key, validated sample or why it is bad)


def block_layout() -> dict:
    """What a manifest records about the blocks its shards hold."""
    return {"samples": BLOCK_SAMPLES, "tokens": BLOCK_TOKENS}


def is_block(raw: dict) -> bool:
    return "lengths.npy" in raw


# ------------------------------------------------------------------------------------------------
# writing


def encode_block(samples: list[dict], keys: list[str]) -> dict[str, bytes]:
    """In-memory samples -> one WebDataset dict of bytes (byte-deterministic, like ``encode_sample``)."""
    if not samples or len(samples) != len(keys):
        raise ValueError(f"a block needs as many keys as samples (>= 1), got {len(samples)} samples, {len(keys)} keys")
    for key in keys:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
    ids = [np.asarray(s["input_ids"], dtype=np.int32) for s in samples]
    starts = [np.asarray(s["doc_starts"], dtype=np.int32) for s in samples]
    lengths = np.array([[a.size, d.size] for a, d in zip(ids, starts)], dtype=np.int64).reshape(len(samples), 2)
    return {
        "__key__": keys[0],
        "input_ids.npy": npy_bytes(np.concatenate(ids)),
        "loss_mask.npy": npy_bytes(np.concatenate([np.asarray(s["loss_mask"], dtype=np.uint8) for s in samples])),
        "doc_starts.npy": npy_bytes(np.concatenate(starts)),
        "lengths.npy": npy_bytes(lengths),
        "meta.json": meta_bytes({"keys": list(keys), "meta": [s["meta"] for s in samples]}),
    }


class BlockWriter:
    """Groups samples into blocks and hands each finished block (a WebDataset dict) to ``write``.

    ``add`` returns the number of samples written by the block it finished (0 while one is filling);
    ``flush`` writes the partial block (call it at every shard end and before closing)."""

    def __init__(self, write: Callable[[dict], object], block_samples: int | None = None,
                 block_tokens: int | None = None):
        block_samples = BLOCK_SAMPLES if block_samples is None else block_samples
        block_tokens = BLOCK_TOKENS if block_tokens is None else block_tokens
        if block_samples < 1 or block_tokens < 1:
            raise ValueError(f"block_samples and block_tokens must be >= 1, got {block_samples}, {block_tokens}")
        self.write, self.block_samples, self.block_tokens = write, block_samples, block_tokens
        self._samples: list[dict] = []
        self._keys: list[str] = []
        self._tokens = 0

    def add(self, sample: dict, key: str) -> int:
        self._samples.append(sample)
        self._keys.append(key)
        self._tokens += int(np.asarray(sample["input_ids"]).size)
        if len(self._samples) >= self.block_samples or self._tokens >= self.block_tokens:
            return self.flush()
        return 0

    def flush(self) -> int:
        n = len(self._samples)
        if n:
            self.write(encode_block(self._samples, self._keys))
            self._samples, self._keys, self._tokens = [], [], 0
        return n


# ------------------------------------------------------------------------------------------------
# reading


def sample_count(raw: dict) -> int:
    """How many samples a raw tar sample holds, from the ``lengths.npy`` header alone (no decoding):
    what the loader uses to skip to a sample position on resume. 1 for the one-sample format and for
    a block whose lengths cannot be read."""
    if not is_block(raw):
        return 1
    try:
        _, shape, _, _ = npy_header(raw["lengths.npy"])
    except Exception:
        return 1
    return int(shape[0]) if len(shape) == 2 and shape[0] >= 1 else 1


def expand_raw(raw: dict, vocab_size: int | None = None) -> list[Item]:
    """One raw tar sample (either format) -> ``[(key, sample or MalformedSample)]``, one entry per
    contained sample (``len == sample_count(raw)``), in order. The samples of a block that is bad as
    a whole are named ``<block key>+<i>`` (their own keys may be unreadable)."""
    key = raw.get("__key__")
    if not is_block(raw):
        try:
            return [(key, decode_sample(raw, vocab_size))]
        except MalformedSample as exc:
            return [(key, exc)]
    try:
        return _expand_block(raw, vocab_size)
    except MalformedSample as exc:  # the block as a whole
        return [(f"{key}+{i}", exc) for i in range(sample_count(raw))]


def iter_samples(raws, vocab_size: int | None = None) -> Iterator[Item]:
    """``(key, sample or MalformedSample)`` for every sample of a stream of raw tar samples."""
    for raw in raws:
        yield from expand_raw(raw, vocab_size)


def read_shard(url, vocab_size: int | None = None) -> Iterator[Item]:
    """``(key, sample or MalformedSample)`` for every sample of one shard (a path or any URL
    webdataset's ``gopen`` reads), in file order; an unreadable tar raises."""
    import webdataset as wds

    yield from iter_samples(wds.tarfile_to_samples()([{"url": str(url)}]), vocab_size)


def _expand_block(raw: dict, vocab_size: int | None) -> list[Item]:
    bkey = raw.get("__key__")

    def whole(msg: str) -> MalformedSample:
        return MalformedSample(f"block {bkey!r}: {msg}")

    missing = [f for f in BLOCK_FIELDS if f not in raw]
    if missing:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise whole(f"lacks {missing} (has {present})")
    try:
        ids = npy_load(raw["input_ids.npy"])
        mask = npy_load(raw["loss_mask.npy"])
        starts = npy_load(raw["doc_starts.npy"])
        lengths = npy_load(raw["lengths.npy"])
        head = json.loads(raw["meta.json"])
        keys, metas = head["keys"], head["meta"]
    except Exception as exc:  # truncated npy, bad json, pickled object arrays, ...
        raise whole(f"cannot decode ({type(exc).__name__}: {exc})") from None
    if lengths.ndim != 2 or lengths.shape[1] != 2 or lengths.shape[0] < 1 or not np.issubdtype(lengths.dtype, np.integer):
        raise whole(f"lengths.npy must be a [K, 2] integer array, got {lengths.dtype} {lengths.shape}")
    K = lengths.shape[0]
    T, D = lengths[:, 0].astype(np.int64), lengths[:, 1].astype(np.int64)
    if not (isinstance(keys, list) and isinstance(metas, list) and len(keys) == len(metas) == K
            and all(isinstance(k, str) for k in keys)):
        raise whole(f"meta.json must hold {K} string keys and {K} meta entries")
    if T.min() < 0 or D.min() < 0 or ids.ndim != 1 or starts.ndim != 1 or mask.ndim != 1:
        raise whole("negative lengths or arrays that are not 1-D")
    if int(T.sum()) != ids.size or mask.size != ids.size or int(D.sum()) != starts.size:
        raise whole(f"lengths add up to {int(T.sum())} tokens and {int(D.sum())} doc starts, the arrays hold "
                    f"{ids.size} ids, {mask.size} mask values and {starts.size} doc starts")
    tok_off = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(T, out=tok_off[1:])
    doc_off = np.zeros(K + 1, dtype=np.int64)
    np.cumsum(D, out=doc_off[1:])
    flagged = _flag(ids, mask, starts, T, D, tok_off, doc_off, metas, vocab_size)
    out: list[Item] = []
    # each sample owns copies of its slices: views would keep the whole block's bytes alive for as long
    # as any one of its samples waits in a shuffle buffer (~70 blocks per 1,000 buffered samples)
    for i in range(K):
        a, b, c, d = tok_off[i], tok_off[i + 1], doc_off[i], doc_off[i + 1]
        s = {"input_ids": ids[a:b].copy(), "loss_mask": mask[a:b].copy(), "doc_starts": starts[c:d].copy(),
             "meta": metas[i]}
        if flagged[i]:  # the per-sample validator decides and says why
            try:
                validate_sample(s, vocab_size=vocab_size, key=keys[i])
            except MalformedSample as exc:
                out.append((keys[i], exc))
                continue
        out.append((keys[i], s))
    return out


def _flag(ids, mask, starts, T, D, tok_off, doc_off, metas, vocab_size) -> np.ndarray:
    """[K] bool: samples that may fail :func:`validate_sample` (a superset of those that do)."""
    K = T.size
    flagged = (T == 0) | (D == 0)
    kinds_ok = (np.issubdtype(ids.dtype, np.integer) and np.issubdtype(starts.dtype, np.integer)
                and (mask.dtype == np.uint8 or mask.dtype == np.bool_))
    if not kinds_ok:
        return np.ones(K, dtype=bool)
    sample_of_token = np.repeat(np.arange(K), T)
    bad_tok = ids < 0
    if vocab_size is not None:
        bad_tok |= ids >= vocab_size
    if mask.dtype == np.uint8:
        bad_tok |= mask > 1
    flagged[sample_of_token[bad_tok]] = True
    nonempty = T > 0
    flagged[np.flatnonzero(nonempty)[mask[tok_off[:-1][nonempty]] != 0]] = True
    if starts.size:
        sample_of_start = np.repeat(np.arange(K), D)
        has_docs = D > 0
        flagged[np.flatnonzero(has_docs)[starts[doc_off[:-1][has_docs]] != 0]] = True
        rising = np.diff(starts) > 0
        rising[doc_off[1:-1][(doc_off[1:-1] > 0) & (doc_off[1:-1] < starts.size)] - 1] = True  # across samples
        flagged[sample_of_start[1:][~rising]] = True
        flagged[sample_of_start[starts >= T[sample_of_start]]] = True
    for i, m in enumerate(metas):
        if not flagged[i] and meta_problem(m, int(T[i])) is not None:
            flagged[i] = True
    return flagged


__all__ = ["BLOCK_FIELDS", "BLOCK_SAMPLES", "BLOCK_TOKENS", "BlockWriter", "block_layout", "encode_block",
           "expand_raw", "is_block", "iter_samples", "read_shard", "sample_count"]
