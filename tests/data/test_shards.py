"""Shard building: byte-identical reruns, manifests, disjoint splits, plain-tar readability, text packing."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megasleep.data.block import BLOCK_FIELDS, expand_raw
from megasleep.data.errors import DataError, MissingShardError
from megasleep.data.manifest import read_manifest, sha256_file
from megasleep.data.sample import MalformedSample
from megasleep.data.shards import build_task_dataset, build_task_split, build_text_dataset

ROOT = Path(__file__).resolve().parents[2]


def read_tar(path) -> list[dict]:
    """Raw tar samples (blocks) of a shard with the standard library only (plain tar, no webdataset)."""
    out: dict[str, dict] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, field = m.name.split(".", 1)
            out.setdefault(key, {"__key__": key})[field] = tf.extractfile(m).read()
    return list(out.values())


def decoded(path, vocab_size=None) -> list[dict]:
    """The validated samples of a shard read by :func:`read_tar` (fails on a malformed one)."""
    items = [it for raw in read_tar(path) for it in expand_raw(raw, vocab_size)]
    assert not [s for _, s in items if isinstance(s, MalformedSample)]
    return [s for _, s in items]


def test_same_seed_byte_identical_shards(tmp_path, r110_tok, r110_data):
    ref_dir, manifests = r110_data
    # same seed, different worker count and a separate process pool: identical bytes
    m = build_task_split("rule110", tmp_path / "again", "train", 320, seed=3, difficulties="1-8",
                         tokenizer=r110_tok.path, shard_size=40, workers=2, progress=False)
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in manifests["train"]["shards"]]
    for s in m["shards"]:
        assert (tmp_path / "again" / s["name"]).read_bytes() == (ref_dir / "train" / s["name"]).read_bytes()
    other = build_task_split("rule110", tmp_path / "other", "train", 40, seed=4, difficulties="1-8",
                             tokenizer=r110_tok.path, shard_size=40, progress=False)
    assert other["shards"][0]["sha256"] != manifests["train"]["shards"][0]["sha256"]


def test_compressed_shards_identical_and_loadable(tmp_path, r110_tok):
    from megasleep.data.loader import build_loader

    kw = dict(num_samples=30, seed=1, difficulties="1-4", tokenizer=r110_tok.path, shard_size=10, progress=False,
              compress=True)
    a = build_task_split("rule110", tmp_path / "a", "train", **kw)
    b = build_task_split("rule110", tmp_path / "b", "train", workers=2, **kw)
    assert [s["name"] for s in a["shards"]] == [f"shard-{k:06d}.tar.gz" for k in range(3)]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    listing = subprocess.run(["tar", "tzf", str(tmp_path / "a" / "shard-000000.tar.gz")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert listing == [f"train-{k:09d}.{f}" for k in (0,) for f in sorted(BLOCK_FIELDS)]  # one block of 10
    plain = build_task_split("rule110", tmp_path / "p", "train", **{**kw, "compress": False})
    assert sum(s["bytes"] for s in a["shards"]) * 4 < sum(s["bytes"] for s in plain["shards"])
    keys = lambda d: sorted(m["_key"] for bt in build_loader({"datasets": [str(d)], "num_workers": 0,  # noqa: E731
                                                                  "epochs": 1}) for m in bt["meta"])
    assert keys(tmp_path / "a") == keys(tmp_path / "p") and len(keys(tmp_path / "a")) == 30


def test_manifest_records_everything(r110_data, r110_tok):
    out, _ = r110_data
    m = read_manifest(out / "train")
    assert m["generator"] == "megasleep.data.tasks.rule110" and m["generator_version"] == "1"
    assert m["params"] == {"n_strings": 4, "width": 24} and m["seed"] == 3 and m["split"] == "train"
    assert m["tokenizer"]["hash"] == r110_tok.hash and m["tokenizer"]["vocab_size"] == r110_tok.vocab_size
    assert m["num_samples"] == 320 and m["num_tokens"] == 320 * 101 and m["num_target_tokens"] == 320 * 4
    assert len(m["shards"]) == 8
    for s in m["shards"]:
        p = out / "train" / s["name"]
        assert s["bytes"] == p.stat().st_size and s["sha256"] == sha256_file(p) and s["samples"] == 40
    assert sum(m["difficulty"]["histogram"].values()) == 320
    with pytest.raises(ValueError, match="several splits"):
        read_manifest(out)
    index = json.loads((out / "manifest.json").read_text())
    assert set(index["splits"]) == {"train", "val", "test"} and index["disjoint_checked"]


def test_splits_share_no_sample(r110_data):
    out, _ = r110_data
    seen = {}
    for split in ("train", "val", "test"):
        for shard in sorted((out / split).glob("*.tar")):
            for s in decoded(shard):
                digest = s["input_ids"].tobytes()
                assert digest not in seen, f"{split} repeats a sample of {seen.get(digest)}"
                seen[digest] = split
    assert len(seen) == 440


def test_disjoint_check_catches_overlap(tmp_path, r110_tok):
    # 1-bit strings, t=0: only 2 distinct samples exist, so val must collide with train
    with pytest.raises(DataError, match="share samples"):
        build_task_dataset("rule110", tmp_path, {"train": 8, "val": 8}, seed=0, difficulties="0",
                           tokenizer=r110_tok.path, params={"n_strings": 1, "width": 1}, progress=False)


def test_plain_tar_and_sample_format(r110_data):
    out, _ = r110_data
    shard = out / "train" / "shard-000000.tar"
    listing = subprocess.run(["tar", "tf", str(shard)], capture_output=True, text=True, check=True).stdout.split()
    assert listing == ["train-000000000.doc_starts.npy", "train-000000000.input_ids.npy",
                       "train-000000000.lengths.npy", "train-000000000.loss_mask.npy", "train-000000000.meta.json"]
    raw = read_tar(shard)[0]  # the shard's 40 samples are one block (K = 64 > 40)
    ids = np.load(__import__("io").BytesIO(raw["input_ids.npy"]))
    lengths = np.load(__import__("io").BytesIO(raw["lengths.npy"]))
    assert ids.dtype == np.int32 and ids.shape == (40 * 101,)
    assert lengths.dtype == np.int64 and lengths.tolist() == [[101, 1]] * 40
    samples = decoded(shard)
    assert len(samples) == 40 and all(s["input_ids"].shape == (101,) for s in samples)
    assert samples[3]["loss_mask"].dtype == np.uint8 and samples[3]["doc_starts"].tolist() == [0]
    head = json.loads(raw["meta.json"])
    assert head["keys"] == [f"train-{i:09d}" for i in range(40)]
    assert {"task", "difficulty", "answer", "answer_positions", "split", "index", "seed", "version"} <= set(head["meta"][0])


@pytest.mark.parametrize("mode", ["pack", "cut"])
def test_text_shards(tmp_path, text_corpus, text_tok, mode):
    T = 64
    m = build_text_dataset([text_corpus / "a.jsonl", text_corpus / "b.txt"], tmp_path / mode, text_tok.path, T,
                           mode=mode, text_field="body", txt_mode="paragraph", shard_size=7, workers=1,
                           progress=False)
    # the documents, tokenized directly
    docs = [json.loads(line)["body"] for line in (text_corpus / "a.jsonl").read_text().splitlines()]
    docs += [p for p in (text_corpus / "b.txt").read_text().split("\n\n") if p.strip()]
    want = [[text_tok.bos_id, *text_tok.encode(d), text_tok.eos_id] for d in docs]
    samples = [s for sh in m["shards"] for s in decoded(tmp_path / mode / sh["name"], text_tok.vocab_size)]
    assert m["documents"] == len(docs) == 65 and m["num_samples"] == len(samples)
    assert m["num_tokens"] == sum(len(w) for w in want)
    for s in samples:
        ids, mask, starts = s["input_ids"], s["loss_mask"], s["doc_starts"]
        assert ids.size <= T and mask[0] == 0 and starts[0] == 0
        assert all(mask[p] == 0 for p in starts) and mask.sum() == ids.size - len(starts)
        assert all(ids[p] == text_tok.bos_id for p in starts[1:])
    if mode == "pack":
        flat = np.concatenate([s["input_ids"] for s in samples]).tolist()
        assert flat == [t for w in want for t in w]
        assert all(s["input_ids"].size == T for s in samples[:-1])
        bos_positions = [i for i, t in enumerate(flat) if t == text_tok.bos_id]
        starts_global = [k * T + int(p) for k, s in enumerate(samples) for p in s["doc_starts"]]
        assert set(bos_positions) <= set(starts_global)  # every document start recorded
    else:
        pieces = [s["input_ids"].tolist() for s in samples]
        assert pieces == [w[k : k + T] for w in want for k in range(0, len(w), T)]
    assert len({sh["sha256"] for sh in m["shards"]}) == len(m["shards"])


def test_text_errors(tmp_path, text_tok):
    with pytest.raises(MissingShardError, match="no file matches"):
        build_text_dataset(str(tmp_path / "nothing*.jsonl"), tmp_path / "o", text_tok.path, 32, progress=False)


def test_clis_end_to_end(tmp_path, text_corpus):
    env_py = sys.executable
    tok = subprocess.run([env_py, str(ROOT / "data_pipelines/train_tokenizer.py"), "--input",
                          str(text_corpus / "a.jsonl"), "--text-field", "body", "--vocab-size", "350",
                          "--out", str(tmp_path / "tok/t")], capture_output=True, text=True)
    assert tok.returncode == 0, tok.stderr
    run = subprocess.run([env_py, str(ROOT / "data_pipelines/build_text_shards.py"), "--input",
                          str(text_corpus / "*.jsonl"), "--text-field", "body", "--tokenizer",
                          str(tmp_path / "tok/t.model"), "--seq-len", "128", "--out", str(tmp_path / "text"),
                          "--workers", "1", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_manifest(tmp_path / "text")["documents"] == 60
    run = subprocess.run([env_py, str(ROOT / "data_pipelines/build_task_shards.py"), "--task", "rule110", "--out",
                          str(tmp_path / "r110"), "--train", "30", "--val", "10", "--difficulty", "1-4",
                          "--param", "width=16", "--shard-size", "10", "--workers", "1", "--no-progress"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    m = read_manifest(tmp_path / "r110" / "train")
    assert m["params"]["width"] == 16 and len(m["shards"]) == 3
    assert (tmp_path / "r110/tokenizer/rule110.model").exists()
