"""The sample format, its validation, and the one-sample-per-key tar layout.

Shards are written as blocks of consecutive samples (:mod:`megasleep.data.block`, what every reader
goes through); the original layout, still read everywhere, is one WebDataset sample per sample, four
tar members sharing a key::

    <key>.input_ids.npy   int32 [T]    token ids
    <key>.loss_mask.npy   uint8 [T]    1 = token t is a target predicted from tokens < t (t=0 never)
    <key>.doc_starts.npy  int32 [D]    positions where a document starts; first is 0, increasing
    <key>.meta.json       {"task", "difficulty", "answer", "answer_positions", ...}

In memory a sample is a dict ``{"input_ids", "loss_mask", "doc_starts", "meta"}`` of numpy arrays
and a dict. :func:`encode_sample` / :func:`decode_sample` convert between the two; encoding is
byte-deterministic (npy format, ``json.dumps(sort_keys=True)``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

FIELDS = ("input_ids.npy", "loss_mask.npy", "doc_starts.npy", "meta.json")
REQUIRED_META = ("task", "difficulty", "answer", "answer_positions")


class MalformedSample(ValueError):
    """A sample is missing a field or a field is malformed (the loader skips and counts it)."""


def make_sample(
    input_ids,
    loss_mask,
    meta: dict,
    doc_starts=None,
) -> dict:
    """Build an in-memory sample with the canonical dtypes (and validate it)."""
    s = {
        "input_ids": np.asarray(input_ids, dtype=np.int32),
        "loss_mask": np.asarray(loss_mask, dtype=np.uint8),
        "doc_starts": np.asarray([0] if doc_starts is None else doc_starts, dtype=np.int32),
        "meta": dict(meta),
    }
    validate_sample(s)
    return s


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


_HEADERS: dict[bytes, tuple[np.dtype, tuple, bool]] = {}


def npy_header(b: bytes) -> tuple[np.dtype, tuple, bool, int]:
    """(dtype, shape, fortran_order, payload offset) of an .npy buffer (no pickles). Headers are
    parsed once per distinct header (``read_array``'s literal_eval dominated the loader's profile)."""
    if b[:6] != b"\x93NUMPY" or len(b) < 10:
        raise ValueError("not an .npy buffer")
    if b[6] == 1:
        hlen, off = int.from_bytes(b[8:10], "little"), 10
    else:
        hlen, off = int.from_bytes(b[8:12], "little"), 12
    header = bytes(b[off : off + hlen])
    parsed = _HEADERS.get(header)
    if parsed is None:
        import ast

        d = ast.literal_eval(header.decode("latin1"))
        dtype = np.dtype(d["descr"])
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        parsed = (dtype, tuple(d["shape"]), bool(d["fortran_order"]))
        if len(_HEADERS) < 4096:
            _HEADERS[header] = parsed
    return (*parsed, off + hlen)


def npy_load(b: bytes) -> np.ndarray:
    """Parse an .npy buffer (no pickles): the same result as ``np.lib.format.read_array``, a
    read-only view of ``b``."""
    dtype, shape, fortran, start = npy_header(b)
    count = int(np.prod(shape)) if shape else 1
    if len(b) - start != count * dtype.itemsize:
        raise ValueError(f"npy payload has {len(b) - start} bytes, header says {count * dtype.itemsize}")
    arr = np.frombuffer(b, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encode_sample(sample: dict, key: str) -> dict[str, Any]:
    """In-memory sample -> WebDataset dict of bytes (what ``TarWriter.write`` takes)."""
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits on them)")
    return {
        "__key__": key,
        "input_ids.npy": npy_bytes(np.asarray(sample["input_ids"], dtype=np.int32)),
        "loss_mask.npy": npy_bytes(np.asarray(sample["loss_mask"], dtype=np.uint8)),
        "doc_starts.npy": npy_bytes(np.asarray(sample["doc_starts"], dtype=np.int32)),
        "meta.json": meta_bytes(sample["meta"]),
    }


def decode_sample(raw: dict, vocab_size: int | None = None) -> dict:
    """WebDataset dict of bytes -> validated in-memory sample. Raises :class:`MalformedSample`."""
    missing = [f for f in FIELDS if f not in raw]
    if missing:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise MalformedSample(f"sample {raw.get('__key__')!r} lacks {missing} (has {present})")
    try:
        s = {
            "input_ids": npy_load(raw["input_ids.npy"]),
            "loss_mask": npy_load(raw["loss_mask.npy"]),
            "doc_starts": npy_load(raw["doc_starts.npy"]),
            "meta": json.loads(raw["meta.json"]),
        }
    except Exception as exc:  # truncated npy, bad json, pickled object arrays, ...
        raise MalformedSample(f"sample {raw.get('__key__')!r}: cannot decode ({type(exc).__name__}: {exc})") from None
    validate_sample(s, vocab_size=vocab_size, key=raw.get("__key__"))
    return s


def validate_sample(s: dict, vocab_size: int | None = None, key: str | None = None) -> None:
    """Check shapes, dtypes and the loss-mask / doc-start invariants; raise :class:`MalformedSample`."""
    name = key or s.get("meta", {}).get("key") or "?"
    ids, mask, starts, meta = s["input_ids"], s["loss_mask"], s["doc_starts"], s["meta"]

    def bad(msg: str):
        raise MalformedSample(f"sample {name!r}: {msg}")

    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        bad(f"input_ids must be a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
    if mask.shape != ids.shape:
        bad(f"loss_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if mask.dtype != np.uint8 and mask.dtype != np.bool_:
        bad(f"loss_mask dtype {mask.dtype} (want uint8)")
    if mask.size and (mask.max() > 1):
        bad("loss_mask values must be 0/1")
    if mask[0]:
        bad("loss_mask[0] is set: position 0 is never a target")
    if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        bad(f"token ids out of range [0, {vocab_size}) (min {ids.min()}, max {ids.max()})")
    if starts.ndim != 1 or starts.size == 0 or not np.issubdtype(starts.dtype, np.integer):
        bad(f"doc_starts must be a non-empty 1-D integer array, got {starts.dtype} {starts.shape}")
    if starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= ids.size:
        bad(f"doc_starts must start at 0, increase, and stay < {ids.size}: {starts[:8].tolist()}")
    problem = meta_problem(meta, ids.size)
    if problem is not None:
        bad(problem)


def meta_problem(meta, length: int) -> str | None:
    """What is wrong with a sample's meta (``length``: its token count), or None."""
    if not isinstance(meta, dict):
        return f"meta.json must be an object, got {type(meta).__name__}"
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        return f"meta lacks {missing}"
    pos = meta["answer_positions"]
    if not isinstance(pos, list) or any((not isinstance(p, int)) or p <= 0 or p >= length for p in pos):
        return "meta.answer_positions must be a list of target positions in (0, T)"
    return None


def collate(samples, pad_id: int = 0, seq_len: int | None = None) -> dict:
    """The one collator: in-memory samples -> a right-padded numpy batch
    ``{"input_ids" [B,T] int64, "loss_mask" [B,T] bool, "doc_ids" [B,T] int64, "meta" [dict]}``.

    ``T`` is ``seq_len`` when given (every sample must fit), else the longest sample. The rule for
    padding: it is a document of its own (doc id one past the sample's last document), so no real
    token ever shares a document with a pad, and the pads carry no targets. Right padding never
    changes a row's real tokens: the model is causal and windows are aligned at position 0.
    (Document ids: one cumulative sum over the batch of marks at every document start and at the
    first pad, not one per row: the loader's hot path.)"""
    if not samples:
        raise ValueError("collate: no samples")
    lens = [int(np.asarray(s["input_ids"]).shape[0]) for s in samples]
    T = seq_len if seq_len is not None else max(lens)
    if max(lens) > T:
        raise ValueError(f"collate: a sample has {max(lens)} tokens > seq_len={T}")
    B = len(samples)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.bool_)
    marks = np.zeros((B, T + 1), dtype=np.int64)  # column T: the pad mark of a full row, dropped
    for b, (s, n) in enumerate(zip(samples, lens)):
        ids[b, :n] = s["input_ids"]
        mask[b, :n] = s["loss_mask"]  # nonzero -> True
        starts = s.get("doc_starts")
        if starts is not None and len(starts) > 1:
            marks[b, np.asarray(starts[1:], dtype=np.int64)] = 1
        marks[b, n] = 1
    docs = np.cumsum(marks[:, :T], axis=1)
    return {"input_ids": ids, "loss_mask": mask, "doc_ids": docs, "meta": [s["meta"] for s in samples]}
