"""A dataset is checked against its manifest: shard sizes always, sha256 on request and once per new
shard set, totals and unlisted shards always, samples without a training target counted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import megasleep.data.manifest as manifest_mod
from megasleep.data.errors import BadDataError, ShardMismatchError
from megasleep.data.manifest import read_manifest, resolve_shards, verify_dataset


@pytest.fixture
def data(tmp_path, r110_data, monkeypatch):
    """A private copy of the 8-shard rule110 train split (every shard has the same size), and a private
    verification cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MEGASLEEP_VERIFY_SHARDS", raising=False)
    d = tmp_path / "train"
    shutil.copytree(r110_data[0] / "train", d)
    return d


def _edit_manifest(d, fn):
    p = d / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def _swap(d, a: str, b: str):
    """Exchange two shards by renaming (sizes and modification times stay as they were)."""
    os.replace(d / a, d / "tmp")
    os.replace(d / b, d / a)
    os.replace(d / "tmp", d / b)


def test_a_swapped_valid_shard_is_caught_by_sha256(data):
    _swap(data, "shard-000000.tar", "shard-000001.tar")
    resolve_shards(data)  # same sizes: the always-on check cannot see it
    with pytest.raises(ShardMismatchError, match=r"2 of 8 shards differ.*shard-000000\.tar: sha256 differs"):
        resolve_shards(data, verify=True)
    with pytest.raises(ShardMismatchError, match="shard-000001.tar"):
        resolve_shards(data, verify="once")


def test_once_hashes_a_shard_set_once_and_again_when_it_changes(data, monkeypatch):
    calls = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    resolve_shards(data, verify="once")
    assert len(calls) == 8
    resolve_shards(data, verify="once")
    assert len(calls) == 8  # remembered
    _swap(data, "shard-000003.tar", "shard-000004.tar")  # a new shard set: checked again, and caught
    with pytest.raises(ShardMismatchError, match="shard-000003.tar"):
        resolve_shards(data, verify="once")
    assert len(calls) == 16
    monkeypatch.setenv("MEGASLEEP_VERIFY_SHARDS", "1")  # the environment asks for the check everywhere
    with pytest.raises(ShardMismatchError):
        resolve_shards(data)


def test_an_explicit_verification_counts_as_the_once(data, monkeypatch):
    verify_dataset(data)  # `megasleep data verify DIR` after copying a dataset
    calls = []
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: calls.append(p))
    resolve_shards(data, verify="once")
    assert calls == []


def test_size_mismatch_fails_or_is_counted_against_the_loaders_budget(data):
    raw = (data / "shard-000002.tar").read_bytes()
    (data / "shard-000002.tar").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BadDataError, match=rf"1 of 8 shards differ.*shard-000002\.tar: {len(raw) // 2} bytes, manifest says"):
        resolve_shards(data)
    with pytest.warns(UserWarning, match="shard-000002.tar"):
        resolve_shards(data, max_bad_fraction=0.2)


def test_manifest_that_undercounts_or_has_wrong_totals_fails(data, tmp_path):
    _edit_manifest(data, lambda m: m.__setitem__("num_samples", m["num_samples"] + 1))
    with pytest.raises(ShardMismatchError, match="num_samples=321 but its shards hold 320"):
        resolve_shards(data)
    def drop_last_shard(m):  # consistent totals, but one shard of the directory left out
        m["shards"].pop()
        for total, key in (("num_samples", "samples"), ("num_tokens", "tokens"), ("num_target_tokens", "targets")):
            m[total] = sum(sh[key] for sh in m["shards"])

    _edit_manifest(data, drop_last_shard)
    with pytest.raises(ShardMismatchError, match=r"holds 1 shard\(s\) it does not list \(shard-000007\.tar\)"):
        resolve_shards(data)
    # a glob over part of a directory does not count the other shards as unlisted
    urls, m = resolve_shards(str(data / "shard-00000[0-3].tar"))
    assert len(urls) == 4 and m is not None


def test_per_shard_sample_undercount_is_found_by_reading_back(data, capsys):
    def undercount(m):
        m["shards"][5]["samples"] -= 1
        m["num_samples"] -= 1

    _edit_manifest(data, undercount)
    resolve_shards(data, verify=True)  # sizes, hashes, totals all consistent
    with pytest.raises(ShardMismatchError, match="shard-000005.tar: 40 samples, manifest says 39"):
        verify_dataset(data, read_samples=True)
    from megasleep.cli import main

    assert main(["data", "verify", str(data), "--samples"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard-000005.tar" in err[0]


def test_samples_without_targets_are_counted_and_reported(tmp_path, text_tok, monkeypatch):
    """Cut mode with seq_len 2: a document of odd length (with <s> and </s>) ends in a one-token piece,
    which has no target."""
    from megasleep.data.shards import build_text_dataset

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    docs = ["the river", "the river ran", "a fox", "houses and boats", "quiet"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    want = sum((len(text_tok.encode(t)) + 2) % 2 for t in docs)
    assert 0 < want < len(docs)
    m = build_text_dataset(tmp_path / "c.jsonl", tmp_path / "out", text_tok.path, 2, mode="cut", min_tokens=1,
                           progress=False)
    assert m["num_samples_without_targets"] == want
    with pytest.warns(UserWarning, match=f"{want} of {m['num_samples']} samples have no training target"):
        resolve_shards(tmp_path / "out")
    assert f"{want} without a training target" in verify_dataset(tmp_path / "out", read_samples=True)


def test_data_verify_cli_on_a_good_dataset(data):
    r = subprocess.run([sys.executable, "-m", "megasleep.cli", "data", "verify", str(data)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "8 shards, 320 samples: sizes and sha256 match" in r.stdout, r.stderr
    assert read_manifest(data)["num_samples_without_targets"] == 0


def test_training_start_up_check_catches_a_swapped_shard(data):
    """`megasleep train` (and `--check-only`) checks the shards, sha256 once per shard set, before any rank
    starts."""
    from megasleep.train.config import load_experiment
    from megasleep.train.preflight import check_paths

    cfg = load_experiment(None, ["data.source=shards", f"data.train={data}", "data.task.name=rule110"])
    check_paths(cfg)  # a clean set passes (and is remembered)
    _swap(data, "shard-000006.tar", "shard-000007.tar")
    with pytest.raises(ShardMismatchError, match="shard-000006.tar: sha256 differs"):
        check_paths(cfg)
