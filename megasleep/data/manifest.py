"""Dataset manifests (``manifest.json`` next to the shards), shard resolution, tokenizer-hash checks.

A manifest records what produced a dataset and what it holds::

    {"format": "megasleep-shards", "format_version": 1, "kind": "task" | "text",
     "task": "rule110", "generator": "megasleep.data.tasks.rule110", "generator_version": "1",
     "params": {...}, "seed": 0, "split": "train",
     "tokenizer": {"path", "hash", "vocab_size", "pad_id", "eos_id", "bos_id"},
     "num_samples": N, "num_tokens": N, "num_target_tokens": N,
     "shards": [{"name": "shard-000000.tar", "samples": n, "tokens": n, "bytes": n, "sha256": "..."}]}

Everything that must fail *before* training starts lives here: :func:`resolve_shards` (missing
shard, empty glob) and :func:`check_tokenizer_hash` (the trainer calls it with the model's hash).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from megasleep.data.errors import MissingShardError, TokenizerMismatchError

MANIFEST = "manifest.json"
FORMAT = "megasleep-shards"
FORMAT_VERSION = 1
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # "pipe:", "http://", "s3://", "hf://", ...


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_record(path: str | os.PathLike, samples: int, tokens: int, **extra: Any) -> dict:
    p = Path(path)
    return {"name": p.name, "samples": int(samples), "tokens": int(tokens), "bytes": p.stat().st_size,
            "sha256": sha256_file(p), **extra}


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (sorted keys, so identical inputs give identical bytes)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    path = d / MANIFEST
    tmp = d / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike) -> dict:
    """Read a manifest (``path`` = the json file or its directory); adds ``_path`` and ``_dir``."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.exists():
        raise MissingShardError(f"manifest not found: {p}")
    with open(p) as f:
        m = json.load(f)
    if m.get("format") != FORMAT:
        raise ValueError(f"{p}: not a megasleep manifest (format={m.get('format')!r})")
    if "splits" in m and "shards" not in m:
        raise ValueError(f"{p} indexes several splits {sorted(m['splits'])}; point at one, e.g. {p.parent / 'train'}")
    m["_path"] = str(p)
    m["_dir"] = str(p.parent)
    return m


def manifest_tokenizer_hash(manifest: dict) -> str | None:
    tok = manifest.get("tokenizer") or {}
    return tok.get("hash")


def check_tokenizer_hash(manifest: dict | str | os.PathLike, expected_hash: str | None) -> None:
    """Raise :class:`TokenizerMismatchError` when the dataset's tokenizer is not ``expected_hash``.

    ``manifest`` is a manifest dict (from :func:`read_manifest`) or a path to one / its directory.
    The message names the manifest path and both hashes. ``expected_hash=None`` checks nothing.
    """
    if expected_hash is None:
        return
    if not isinstance(manifest, dict):
        manifest = read_manifest(manifest)
    got = manifest_tokenizer_hash(manifest)
    where = manifest.get("_path", "<manifest>")
    if got is None:
        raise TokenizerMismatchError(f"{where}: records no tokenizer hash; expected {expected_hash}")
    if got != expected_hash:
        tok_path = (manifest.get("tokenizer") or {}).get("path")
        raise TokenizerMismatchError(
            f"tokenizer mismatch for dataset {where}: the shards were tokenized with {got} "
            f"({tok_path}) but the model's tokenizer is {expected_hash}"
        )


def is_url(s: str) -> bool:
    return bool(_URL_RE.match(s)) and not s.startswith("file:") and not (len(s) > 1 and s[1] == ":" and s[0].isalpha())


def resolve_shards(spec: str | os.PathLike | list) -> tuple[list[str], dict | None]:
    """Turn a dataset spec into (list of shard urls/paths, manifest or None). Fails early.

    ``spec``: a directory holding ``manifest.json``; a ``manifest.json`` path; a local glob
    (``data/*.tar``); a brace pattern (``data/shard-{000000..000009}.tar``); a URL understood by
    webdataset (``pipe:...``, ``http(s)://...``, ``hf://...``; ``::`` separates several); or a list
    of any of these. Local shards must exist (:class:`MissingShardError` names the path); remote
    ones are checked when read.
    """
    if isinstance(spec, (list, tuple)):
        urls: list[str] = []
        manifest = None
        for item in spec:
            u, m = resolve_shards(item)
            urls.extend(u)
            manifest = manifest or m
        if not urls:
            raise MissingShardError(f"dataset spec {spec!r} names no shard")
        return urls, manifest
    s = str(spec)
    p = Path(s)
    if s.endswith(".json") or p.is_dir():
        m = read_manifest(p)
        base = Path(m["_dir"])
        urls = []
        for sh in m["shards"]:
            sp = base / sh["name"]
            if not sp.exists():
                raise MissingShardError(f"shard {sp} listed in {m['_path']} does not exist")
            urls.append(str(sp))
        if not urls:
            raise MissingShardError(f"{m['_path']} lists no shard")
        return urls, m
    import braceexpand

    urls = []
    for part in s.split("::"):
        for u in braceexpand.braceexpand(part):
            if is_url(u):
                urls.append(u)
            elif any(c in u for c in "*?["):
                hits = sorted(glob.glob(u))
                if not hits:
                    raise MissingShardError(f"no shard matches {u!r}")
                urls.extend(hits)
            else:
                if u.startswith("file:"):
                    u = u[5:]
                if not Path(u).exists():
                    raise MissingShardError(f"shard not found: {u}")
                urls.append(u)
    if not urls:
        raise MissingShardError(f"dataset spec {s!r} names no shard")
    manifest = None
    parents = {str(Path(u).parent) for u in urls if not is_url(u)}
    if len(parents) == 1 and (Path(next(iter(parents))) / MANIFEST).exists():
        manifest = read_manifest(next(iter(parents)))
    return urls, manifest
