"""Test helpers that read and rewrite shards sample by sample, in either format."""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from megasleep.data.block import BlockWriter, read_shard
from megasleep.data.manifest import read_manifest, shard_record
from megasleep.data.sample import MalformedSample, encode_sample
from megasleep.data.shard_writer import TAR_KW


def shard_samples(path) -> list[tuple[str, dict]]:
    """(key, sample) of every sample of a shard, in order (fails on a malformed one)."""
    items = list(read_shard(path))
    bad = [s for _, s in items if isinstance(s, MalformedSample)]
    assert not bad, bad[:2]
    return [(k, {**s, "meta": dict(s["meta"])}) for k, s in items]


def all_keys(directory) -> list[str]:
    """Every sample key of a dataset, shard by shard in manifest order."""
    m = read_manifest(directory)
    return [k for sh in m["shards"] for k, _ in shard_samples(Path(m["_dir"]) / sh["name"])]


def tar_members(path) -> list[str]:
    with tarfile.open(path) as tf:
        return tf.getnames()


def write_shard(path, samples: list[tuple[str, dict]], block_samples: int | None = 64) -> None:
    """Write ``samples`` as one shard: blocks of ``block_samples``, or with ``None`` the one-sample-per-key
    format (what shards written before blocks hold)."""
    import webdataset as wds

    with wds.TarWriter(str(path), **TAR_KW) as w:
        if block_samples is None:
            for key, s in samples:
                w.write(encode_sample(s, key))
            return
        blocks = BlockWriter(w.write, block_samples=block_samples)
        for key, s in samples:
            blocks.add(s, key)
        blocks.flush()


def rewrite_dataset(src, dst, block_samples: int | None, edit: Callable[[str, dict], dict | None] | None = None,
                    shards: list[int] | None = None) -> Path:
    """Copy dataset ``src`` to ``dst`` rewriting shards (all, or the positions ``shards``) as blocks of
    ``block_samples`` (``None``: the one-sample-per-key format, manifest version 1) with every sample
    passed through ``edit(key, sample) -> sample | None`` (None drops it). The manifest's sizes and
    sha256 are updated; its counts are kept (an edit that drops samples makes the shard short)."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    for pos, sh in enumerate(m["shards"]):
        if shards is not None and pos not in shards:
            continue
        samples = shard_samples(src / sh["name"])
        if edit is not None:
            samples = [(k, e) for k, s in samples if (e := edit(k, s)) is not None]
        write_shard(dst / sh["name"], samples, block_samples)
        rec = shard_record(dst / sh["name"], 1, 1)
        sh["bytes"], sh["sha256"] = rec["bytes"], rec["sha256"]
    if block_samples is None:
        m["format_version"] = 1
        m.pop("block", None)
    (dst / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    return dst
