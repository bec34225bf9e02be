"""Dataset manifests (``manifest.json`` next to the shards), shard resolution, tokenizer-hash checks.

A manifest records what produced a dataset and what it holds::

    {"format": "megasleep-shards", "format_version": 2, "kind": "task" | "text",
     "task": "rule110", "generator": "megasleep.data.tasks.rule110", "generator_version": "1",
     "params": {...}, "seed": 0, "split": "train",
     "tokenizer": {"path", "hash", "vocab_size", "pad_id", "eos_id", "bos_id"},
     "num_samples": N, "num_tokens": N, "num_target_tokens": N, "num_samples_without_targets": N,
     "block": {"samples": 64, "tokens": 262144},
     "shards": [{"name": "shard-000000.tar", "samples": n, "tokens": n, "targets": n, "no_target": n,
                 "bytes": n, "sha256": "..."}]}

Version 2 shards hold blocks of samples (:mod:`megasleep.data.block`); version 1 shards hold one
sample per tar key and still load. Per-shard and total counts are in samples either way.

Everything that must fail *before* training starts lives here: :func:`resolve_shards` (missing
shard, empty glob, a shard whose size differs from the manifest's, shards in the directory that the
manifest does not list, totals that do not add up, and on request every shard's sha256) and
:func:`check_tokenizer_hash` (the trainer calls it with the model's hash).

sha256 checks: ``verify=True`` always; ``verify="once"`` once per shard set: a stamp named by a hash
of the manifest's bytes and every shard's (name, size, mtime, inode) is written under
``$XDG_CACHE_HOME/megasleep/verified/`` (``~/.cache/...``) after a clean check, so a copied,
rebuilt, renamed or swapped shard is checked again. ``MEGASLEEP_VERIFY_SHARDS=1`` makes every
:func:`resolve_shards` call verify; :func:`verify_dataset` (``megasleep data verify``) can also read
every sample and compare the counts.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from megasleep.atomic import atomic_write
from megasleep.data.errors import MissingShardError, ShardMismatchError, TokenizerMismatchError

MANIFEST = "manifest.json"
FORMAT = "megasleep-shards"
FORMAT_VERSION = 2  # 2: block shards; 1: one sample per tar key (both read)
READABLE_VERSIONS = (1, 2)
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # "pipe:", "http://", "s3://", "hf://", ...
_SHARD_GLOBS = ("shard-*.tar", "shard-*.tar.gz")
Verify = bool | Literal["once"]


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB pieces (the one hash helper of the data stack)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_record(path: str | os.PathLike, samples: int, tokens: int, **extra: Any) -> dict:
    """A manifest's entry for one written shard (extra: ``targets``, ``no_target`` counts, ...)."""
    p = Path(path)
    return {"name": p.name, "samples": int(samples), "tokens": int(tokens), "bytes": p.stat().st_size,
            "sha256": sha256_file(p), **extra}


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (sorted keys, so identical inputs give identical bytes)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    path = d / MANIFEST
    atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
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
    if m.get("format_version", 1) not in READABLE_VERSIONS:
        raise ValueError(f"{p}: format_version {m.get('format_version')!r} is not one this megasleep reads "
                         f"{READABLE_VERSIONS} (written by a newer version?)")
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


def resolve_shards(spec: str | os.PathLike | list, verify: Verify | None = None,
                   max_bad_fraction: float = 0.0) -> tuple[list[str], dict | None]:
    """Turn a dataset spec into (list of shard urls/paths, manifest or None). Fails early.

    ``spec``: a directory holding ``manifest.json``; a ``manifest.json`` path; a local glob
    (``data/*.tar``); a brace pattern (``data/shard-{000000..000009}.tar``); a URL understood by
    webdataset (``pipe:...``, ``http(s)://...``, ``hf://...``; ``::`` separates several); or a list
    of any of these. Local shards must exist (:class:`MissingShardError` names the path); remote
    ones are checked when read. A dataset with a manifest is checked by :func:`check_manifest`
    (``verify``: sha256 too — True, "once", or None: only if ``MEGASLEEP_VERIFY_SHARDS`` is set;
    up to ``max_bad_fraction`` of the shards may differ, with a warning naming them: the loader
    passes its own budget for damaged shards).
    """
    if isinstance(spec, (list, tuple)):
        urls: list[str] = []
        manifest = None
        for item in spec:
            u, m = resolve_shards(item, verify, max_bad_fraction)
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
        check_manifest(m, verify=verify, max_bad_fraction=max_bad_fraction)
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
        check_manifest(manifest, verify=verify, max_bad_fraction=max_bad_fraction, names={Path(u).name for u in urls})
    return urls, manifest


# ------------------------------------------------------------------------------------------------
# checking a dataset against its manifest


def _totals_problems(m: dict) -> list[str]:
    """The manifest's totals against the sum of its shard entries."""
    out = []
    for total, key in (("num_samples", "samples"), ("num_tokens", "tokens"), ("num_target_tokens", "targets")):
        if total in m and all(key in sh for sh in m["shards"]):
            summed = sum(int(sh[key]) for sh in m["shards"])
            if int(m[total]) != summed:
                out.append(f"{total}={m[total]} but its shards hold {summed}")
    return out


def _unlisted_shards(m: dict) -> list[str]:
    listed = {sh["name"] for sh in m["shards"]}
    base = Path(m["_dir"])
    return sorted(q.name for g in _SHARD_GLOBS for q in base.glob(g) if q.name not in listed)


def _stamp_path(m: dict) -> Path:
    """Where a clean sha256 check of exactly this manifest + these shard files is remembered."""
    h = hashlib.sha256(Path(m["_path"]).read_bytes())
    base = Path(m["_dir"])
    for sh in m["shards"]:
        st = (base / sh["name"]).stat()
        h.update(f"{sh['name']}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}".encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megasleep" / "verified"
    return cache / f"{h.hexdigest()}.json"


def _mark_verified(stamp: Path, m: dict) -> None:
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(stamp, json.dumps({"manifest": m["_path"], "shards": len(m["shards"])}) + "\n",
                     suffix=f".{os.getpid()}.tmp")  # ranks / processes may stamp the same set at once
    except OSError as exc:  # a read-only home: the check is simply repeated next time
        warnings.warn(f"could not remember the sha256 check of {m['_path']} ({exc}); it will run again",
                      stacklevel=3)


def check_manifest(m: dict, verify: Verify | None = None, max_bad_fraction: float = 0.0,
                   names: set[str] | None = None) -> list[str]:
    """Check a dataset directory against its manifest ``m`` (from :func:`read_manifest`).

    Always: totals equal the sums of the shard entries, no shard file in the directory is missing
    from the manifest (an under-counting manifest), every shard's size is the recorded ``bytes``.
    With ``verify`` (True, or "once" for a shard set not checked before): every shard's sha256.
    ``names`` limits the per-shard checks to those shards (a glob over part of the directory).
    Raises :class:`ShardMismatchError` naming the manifest and the shards when the totals are wrong,
    shards are unlisted, or more than ``max_bad_fraction`` of the shards differ; fewer differing
    shards get a warning. Warns when the manifest counts samples with no training target.
    Returns the names of the differing shards.
    """
    where = m.get("_path", "<manifest>")
    problems = _totals_problems(m)
    unlisted = _unlisted_shards(m) if names is None else []
    if unlisted:
        problems.append(f"the directory holds {len(unlisted)} shard(s) it does not list ({', '.join(unlisted[:5])})")
    if problems:
        raise ShardMismatchError(f"{where}: {'; '.join(problems)}: the manifest does not describe the shards; "
                                 "rebuild the dataset")
    if verify is None:
        verify = os.environ.get("MEGASLEEP_VERIFY_SHARDS", "") not in ("", "0")
    shards = [sh for sh in m["shards"] if names is None or sh["name"] in names]
    base = Path(m["_dir"])
    bad: dict[str, str] = {}
    for sh in shards:
        size = (base / sh["name"]).stat().st_size
        if "bytes" in sh and size != int(sh["bytes"]):
            bad[sh["name"]] = f"{size} bytes, manifest says {sh['bytes']}"
    stamp = _stamp_path(m) if verify else None  # a clean explicit check counts as the "once" too
    hashing = verify is True or (stamp is not None and not stamp.exists())
    if hashing:
        for sh in shards:
            if sh["name"] not in bad and "sha256" in sh and sha256_file(base / sh["name"]) != sh["sha256"]:
                bad[sh["name"]] = "sha256 differs from the manifest's (replaced by another shard?)"
    if bad:
        listing = "; ".join(f"{n}: {why}" for n, why in sorted(bad.items()))
        msg = f"{where}: {len(bad)} of {len(shards)} shards differ from the manifest ({listing})"
        if len(bad) > max_bad_fraction * len(shards):
            raise ShardMismatchError(f"{msg}; rebuild or re-copy them (`megasleep data verify {m['_dir']}` "
                                     "checks a dataset)")
        warnings.warn(f"{msg}; they will be read as damaged shards", stacklevel=3)
    elif stamp is not None and hashing:
        _mark_verified(stamp, m)
    no_target = m.get("num_samples_without_targets")
    if no_target:
        warnings.warn(f"{where}: {no_target} of {m.get('num_samples')} samples have no training target "
                      "(loss_mask all 0): they cost compute and teach nothing", stacklevel=3)
    return sorted(bad)


def shard_counts(path: str | os.PathLike) -> dict[str, int]:
    """Read a shard back (either format): samples, tokens, target tokens, samples without any target,
    and samples that fail validation."""
    import numpy as np
    import webdataset as wds

    from megasleep.data.block import iter_samples
    from megasleep.data.sample import MalformedSample

    counts = {"samples": 0, "tokens": 0, "targets": 0, "no_target": 0, "bad": 0}

    def handler(exn: Exception) -> bool:  # webdataset appends (stream, url) to the exception's args
        why = exn.args[0] if exn.args else exn
        if isinstance(exn, ShardMismatchError):  # raised here once, passed through an outer layer
            raise ShardMismatchError(why) from None
        raise ShardMismatchError(f"{path}: unreadable shard ({type(exn).__name__}: {why})") from None

    for _, s in iter_samples(wds.tarfile_to_samples(handler=handler)([{"url": str(path)}])):
        counts["samples"] += 1
        if isinstance(s, MalformedSample):
            counts["bad"] += 1
            continue
        counts["tokens"] += int(s["input_ids"].size)
        n = int(np.count_nonzero(s["loss_mask"]))
        counts["targets"] += n
        counts["no_target"] += n == 0
    return counts


def verify_dataset(path: str | os.PathLike, read_samples: bool = False) -> str:
    """Full check of one dataset (``megasleep data verify``): :func:`check_manifest` with sha256, and with
    ``read_samples`` every sample read back: per-shard sample / token / target counts against the
    manifest, every sample validated, and samples without a training target counted. Raises
    :class:`ShardMismatchError`; returns a one-line summary."""
    m = read_manifest(path)
    check_manifest(m, verify=True)
    summary = f"{m['_path']}: {len(m['shards'])} shards, {m.get('num_samples')} samples: sizes and sha256 match"
    if not read_samples:
        return summary
    base = Path(m["_dir"])
    wrong, no_target = [], 0
    for sh in m["shards"]:
        got = shard_counts(base / sh["name"])
        no_target += got["no_target"]
        if got["bad"]:
            wrong.append(f"{sh['name']}: {got['bad']} samples fail validation")
        for key in ("samples", "tokens", "targets"):
            if key in sh and got[key] != int(sh[key]):
                wrong.append(f"{sh['name']}: {got[key]} {key}, manifest says {sh[key]}")
    if wrong:
        raise ShardMismatchError(f"{m['_path']}: the shards do not hold what the manifest counts ({'; '.join(wrong)})")
    return f"{summary}; samples read back: counts match, {no_target} without a training target"
