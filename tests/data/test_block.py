"""Block shards: writing (block boundaries, token budget), reading both formats through every reader,
vectorised validation equal to the per-sample validator, bad samples and blocks, and the loader's
contract (same samples in the same order give the same batches; resume inside a block)."""

from __future__ import annotations

import io
import json
import tarfile
import warnings

import numpy as np
import pytest

import megasleep.data.block as block_mod
import megasleep.data.worker_stream as worker_stream
from megasleep.data.block import encode_block, expand_raw, read_shard, sample_count
from megasleep.data.loader import build_loader
from megasleep.data.manifest import read_manifest, shard_counts, verify_dataset
from megasleep.data.sample import MalformedSample, encode_sample, validate_sample
from tests.data.shard_tools import all_keys, rewrite_dataset, shard_samples, tar_members, write_shard
from tests.data.test_loader import run, same

VOCAB = 50


@pytest.fixture(scope="module")
def k16(tmp_path_factory, r110_tok):
    """rule110 train: 6 shards x 40 samples written as blocks of 16 (16 + 16 + 8 per shard)."""
    from megasleep.data.shards import build_task_split

    out = tmp_path_factory.mktemp("k16")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(block_mod, "BLOCK_SAMPLES", 16)
        build_task_split("rule110", out, "train", 240, seed=5, difficulties="1-8", tokenizer=r110_tok.path,
                         shard_size=40, progress=False)
    return out


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, k16):
    """The same samples as ``k16`` in the one-sample-per-key format (manifest version 1)."""
    return rewrite_dataset(k16, tmp_path_factory.mktemp("legacy") / "train", block_samples=None)


def _samples(ds) -> list[tuple[str, dict]]:
    m = read_manifest(ds)
    return [ks for sh in m["shards"] for ks in shard_samples(ds / sh["name"])]


def _equal(a: dict, b: dict) -> bool:
    return all(np.array_equal(a[f], b[f]) and a[f].dtype == b[f].dtype for f in ("input_ids", "loss_mask", "doc_starts")) \
        and a["meta"] == b["meta"]


# ------------------------------------------------------------------------------------------------ writing
def test_blocks_are_cut_at_k_samples_and_never_span_shards(k16):
    m = read_manifest(k16)
    assert m["format_version"] == 2 and m["block"] == {"samples": 16, "tokens": 1 << 18}
    members = tar_members(k16 / "shard-000001.tar")
    assert len(members) == 3 * 5 and members[0] == "train-000000040.doc_starts.npy"
    assert [n.split(".")[0] for n in members[::5]] == ["train-000000040", "train-000000056", "train-000000072"]
    assert [s["samples"] for s in m["shards"]] == [40] * 6
    assert all_keys(k16) == [f"train-{i:09d}" for i in range(240)]


@pytest.mark.parametrize("k,budget,want", [(1, 1 << 18, [1] * 10), (4, 1 << 18, [4, 4, 2]), (64, 250, [3, 3, 3, 1])])
def test_block_sizes_k1_k_not_dividing_and_token_budget(tmp_path, r110_tok, monkeypatch, k, budget, want):
    """Samples of 101 tokens: a budget of 250 tokens ends a block at its third sample (303 >= 250)."""
    from megasleep.data.shards import build_task_split

    monkeypatch.setattr(block_mod, "BLOCK_SAMPLES", k)
    monkeypatch.setattr(block_mod, "BLOCK_TOKENS", budget)
    m = build_task_split("rule110", tmp_path / "d", "train", 20, seed=1, difficulties="1-4", tokenizer=r110_tok.path,
                         shard_size=10, progress=False)
    assert m["block"] == {"samples": k, "tokens": budget}
    for sh in m["shards"]:
        with tarfile.open(tmp_path / "d" / sh["name"]) as tf:
            sizes = [np.load(io.BytesIO(tf.extractfile(x).read())).shape[0] for x in tf if x.name.endswith("lengths.npy")]
        assert sizes == want
    assert all_keys(tmp_path / "d") == [f"train-{i:09d}" for i in range(20)]


def test_counting_writer_cuts_blocks_at_shard_ends(tmp_path, text_corpus, text_tok, monkeypatch):
    """The text writer (CountingShardWriter): shards of 7 samples in blocks of 3 -> 3 + 3 + 1."""
    from megasleep.data.shards import build_text_dataset

    monkeypatch.setattr(block_mod, "BLOCK_SAMPLES", 3)
    m = build_text_dataset(text_corpus / "a.jsonl", tmp_path / "t", text_tok.path, 32, mode="cut",
                           text_field="body", shard_size=7, progress=False)
    assert all(sh["samples"] == 7 for sh in m["shards"][:-1]) and m["num_samples"] == sum(
        sh["samples"] for sh in m["shards"])
    heads = [n.split(".")[0] for n in tar_members(tmp_path / "t" / m["shards"][1]["name"])[::5]]
    assert heads == ["text-000000007", "text-000000010", "text-000000013"]
    counts = shard_counts(tmp_path / "t" / m["shards"][1]["name"])
    assert (counts["samples"], counts["tokens"], counts["bad"]) == (7, m["shards"][1]["tokens"], 0)


def test_block_bytes_are_deterministic_and_readable_by_plain_tar(k16, tmp_path):
    samples = shard_samples(k16 / "shard-000000.tar")
    write_shard(tmp_path / "again.tar", samples, block_samples=16)
    assert (tmp_path / "again.tar").read_bytes() == (k16 / "shard-000000.tar").read_bytes()


# ------------------------------------------------------------------------------------------------ reading
def test_old_and_new_format_give_the_same_samples_through_every_reader(k16, legacy):
    from megasleep.eval.data import load_shard_data

    new, old = _samples(k16), _samples(legacy)
    assert [k for k, _ in new] == [k for k, _ in old] and len(new) == 240
    assert all(_equal(a, b) for (_, a), (_, b) in zip(new, old))
    for ds in (k16, legacy):  # evaluation reads both, in order
        ev = load_shard_data(ds, max_examples=100)
        assert len(ev.samples) == 100 and all(_equal(a, b) for a, (_, b) in zip(ev.samples, new))
        assert "samples read back: counts match" in verify_dataset(ds, read_samples=True)
    assert read_manifest(legacy)["format_version"] == 1


def test_manifest_from_the_future_is_refused(k16, tmp_path):
    d = rewrite_dataset(k16, tmp_path / "v3", block_samples=16, shards=[])
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 3
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest\.json: format_version 3 is not one this megasleep reads"):
        build_loader({"datasets": [str(d)]})


def _random_block(rng, K: int, vocab: int = VOCAB) -> tuple[list[dict], list[str]]:
    samples = []
    for _ in range(K):
        T = int(rng.integers(1, 12))
        mask = rng.integers(0, 2, T).astype(np.uint8)
        mask[0] = 0
        starts = np.unique(np.concatenate([[0], rng.integers(0, T, int(rng.integers(0, 3)))])).astype(np.int32)
        pos = sorted(set(rng.integers(1, T, int(rng.integers(0, 2))).tolist())) if T > 1 else []
        samples.append({"input_ids": rng.integers(0, vocab, T).astype(np.int32), "loss_mask": mask,
                        "doc_starts": starts, "meta": {"task": "t", "difficulty": 1, "answer": "", "answer_positions": pos}})
    return samples, [f"s-{i:04d}" for i in range(K)]


def _corrupt(rng, s: dict) -> None:
    """One of the faults validate_sample knows, applied in place."""
    T = s["input_ids"].size
    kind = int(rng.integers(0, 10))
    if kind == 0:
        s["loss_mask"][int(rng.integers(0, T))] = 2
    elif kind == 1:
        s["loss_mask"][0] = 1
    elif kind == 2:
        s["input_ids"][int(rng.integers(0, T))] = -1
    elif kind == 3:
        s["input_ids"][int(rng.integers(0, T))] = VOCAB
    elif kind == 4:
        s["doc_starts"] = np.array([1, *s["doc_starts"][1:]], dtype=np.int32) if T > 1 else np.array([], np.int32)
    elif kind == 5:
        s["doc_starts"] = np.concatenate([s["doc_starts"], s["doc_starts"][-1:]])  # not increasing
    elif kind == 6:
        s["doc_starts"] = np.concatenate([s["doc_starts"], [T + int(rng.integers(0, 3))]]).astype(np.int32)
    elif kind == 7:
        del s["meta"][str(rng.choice(["task", "difficulty", "answer", "answer_positions"]))]
    elif kind == 8:
        s["meta"]["answer_positions"] = [int(rng.choice([0, T, -1]))]
    else:
        s["input_ids"], s["loss_mask"] = s["input_ids"][:0], s["loss_mask"][:0]  # empty sample


def test_vectorised_validation_equals_the_per_sample_validator():
    """Fresh random blocks with random faults in random samples: every sample's verdict and message
    from the block path equal validate_sample's on that sample alone, with and without a vocab."""
    rng = np.random.default_rng(0)
    n_bad = 0
    for trial in range(300):
        samples, keys = _random_block(rng, int(rng.integers(1, 9)))
        for s in samples:
            if rng.random() < 0.3:
                _corrupt(rng, s)
        vocab = VOCAB if trial % 2 else None
        got = expand_raw(encode_block(samples, keys), vocab)
        assert [k for k, _ in got] == keys
        for (key, res), s in zip(got, samples):
            want = None
            try:
                validate_sample(s, vocab_size=vocab, key=key)
            except MalformedSample as exc:
                want = str(exc)
            if want is None:
                assert not isinstance(res, MalformedSample), (key, res)
                assert _equal(res, s)
            else:
                n_bad += 1
                assert isinstance(res, MalformedSample) and str(res) == want
    assert n_bad > 100


def test_a_sample_does_not_keep_its_block_alive():
    """A sample waiting in a shuffle buffer must not pin its whole block's bytes (a buffer of 1,000
    samples would otherwise hold ~70 blocks): every array owns its memory."""
    samples, keys = _random_block(np.random.default_rng(2), 8)
    for key, s in expand_raw(encode_block(samples, keys), VOCAB):
        assert not isinstance(s, MalformedSample), (key, s)
        for f in ("input_ids", "loss_mask", "doc_starts"):
            assert s[f].base is None and s[f].flags.owndata, (key, f)


def test_undecodable_block_counts_k_or_one():
    rng = np.random.default_rng(1)
    samples, keys = _random_block(rng, 5)
    raw = encode_block(samples, keys)
    assert sample_count(raw) == 5 and sample_count(encode_sample(samples[0], "x")) == 1
    for field, junk in (("meta.json", b"{not json"), ("input_ids.npy", raw["input_ids.npy"][:-4]),
                        ("loss_mask.npy", encode_block(samples[:4], keys[:4])["loss_mask.npy"])):
        got = expand_raw({**raw, field: junk})
        assert len(got) == 5 and all(isinstance(r, MalformedSample) for _, r in got)
        assert f"block {keys[0]!r}" in str(got[0][1]) and len({k for k, _ in got}) == 5
    got = expand_raw({**raw, "lengths.npy": b"garbage"})  # K unknown: one bad sample
    assert sample_count({**raw, "lengths.npy": b"garbage"}) == 1 and len(got) == 1
    assert isinstance(got[0][1], MalformedSample)
    assert "lacks ['doc_starts.npy']" in str(expand_raw({k: v for k, v in raw.items() if k != "doc_starts.npy"})[0][1])


# ------------------------------------------------------------------------------------------------ loader
def _cfg(*paths, **kw) -> dict:
    return {"datasets": [str(p) for p in paths], "batch_size": 5, "num_workers": 0, "shuffle_buffer": 12, "seed": 4,
            "epochs": 2, **kw}


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_from_old_new_and_mixed_shards(k16, legacy, tmp_path, workers):
    """The loader's contract does not depend on the format: legacy shards, blocks of 16, blocks of 64 and
    a mix of legacy and block shards in one dataset give identical batches."""
    mixed = rewrite_dataset(k16, tmp_path / "mixed", block_samples=None, shards=[1, 2, 5])
    k64 = rewrite_dataset(k16, tmp_path / "k64", block_samples=64)
    ref = run(build_loader(_cfg(legacy, num_workers=workers)))
    assert sum(len(b[0]) for b in ref) == 480
    for ds in (k16, mixed, k64):
        assert same(run(build_loader(_cfg(ds, num_workers=workers))), ref), ds.name


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_inside_a_block_equals_uninterrupted(k16, workers):
    """Batches of 5 from blocks of 16 with a shuffle buffer of 12: every stop lands inside a block and
    the buffer holds samples of several blocks; the resumed run continues bit-identically."""
    cfg = _cfg(k16, num_workers=workers)
    full = run(build_loader(cfg))
    for k in (1, 3, 7, 19, 50, len(full) - 1):
        first = build_loader(cfg)
        head = run(first, limit=k)
        state = json.loads(json.dumps(first.state_dict()))
        positions = [s["sample_pos"] for w in state["workers"] if w for s in w["sources"]]
        resumed = build_loader(cfg)
        resumed.load_state_dict(state)
        assert same(head + run(resumed), full), f"resume after {k} batches differs ({positions})"


def test_resume_decodes_only_the_blocks_it_needs(k16, monkeypatch):
    """No shuffle buffer, no shard shuffle: stopped at sample 37 of shard 0 (its third block), the
    resumed loader skips blocks 1 and 2 by their lengths header and decodes only from block 3 on."""
    cfg = _cfg(k16, shuffle_buffer=0, shuffle_shards=False, batch_size=37, epochs=1)
    first = build_loader(cfg)
    run(first, limit=1)
    state = first.state_dict()
    assert state["workers"][0]["sources"][0]["sample_pos"] == 37
    decoded = []
    real = worker_stream.expand_raw
    monkeypatch.setattr(worker_stream, "expand_raw", lambda raw, vocab: decoded.append(raw["__key__"]) or real(raw, vocab))
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    batch = run(resumed, limit=1)[0]
    assert batch[0][:4] == ["train-000000037", "train-000000038", "train-000000039", "train-000000040"]
    assert decoded[:2] == ["train-000000032", "train-000000040"]


def test_bad_sample_inside_a_block_is_skipped_and_counted_neighbours_kept(k16, tmp_path):
    def edit(key, s):
        if key == "train-000000085":  # sample 5 of shard 2's second block
            s["loss_mask"] = s["loss_mask"].copy()
            s["loss_mask"][0] = 1
        return s

    bad = rewrite_dataset(k16, tmp_path / "bad", block_samples=16, edit=edit, shards=[2])
    loader = build_loader(_cfg(bad, epochs=1, shuffle_buffer=0, shuffle_shards=False))
    it = iter(loader)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        keys = [k for b in [next(it) for _ in range(24)] for k in (m["_key"] for m in b["meta"])]
        stats = loader.stats()
    assert keys[:120] == [f"train-{i:09d}" for i in range(121) if i != 85]
    assert stats["bad_samples"] == 1 and stats["bad_shards"] == 0
    msg = stats["bad_examples"][0]
    assert "shard-000002.tar" in msg and "'train-000000085'" in msg and "loss_mask[0] is set" in msg
    assert any("train-000000085" in str(x.message) for x in w)


def test_truncated_shard_keeps_whole_blocks_and_counts_the_rest(k16, tmp_path):
    """Shard 3 cut inside its second block: the first block's 16 samples are read, the shard is one
    bad shard (16 samples, manifest says 40)."""
    d = rewrite_dataset(k16, tmp_path / "cut", block_samples=16, shards=[])
    data = (d / "shard-000003.tar").read_bytes()
    (d / "shard-000003.tar").write_bytes(data[: int(len(data) * 0.55)])
    loader = build_loader(_cfg(d, epochs=1, shuffle_buffer=0, shuffle_shards=False, max_bad_fraction=0.5,
                               warn_bad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the manifest check warns about the size
        it = iter(loader)
        keys = [m["_key"] for b in [next(it) for _ in range(35)] for m in b["meta"]]
        stats = loader.stats()
    got3 = [k for k in keys if 120 <= int(k.split("-")[1]) < 160]
    assert got3 == [f"train-{i:09d}" for i in range(120, 136)]
    assert stats["bad_shards"] == 1 and stats["bad_shard_names"][0].endswith("shard-000003.tar")
    assert [k for k, _ in read_shard(d / "shard-000004.tar")][:1] == ["train-000000160"]  # the next shard is whole


# ------------------------------------------------------------------------------------------------ hot path
def _rand_u64_reference(*keys: int) -> int:
    """The loader's original hash of (seed, stream, counters), written out."""
    import hashlib
    import struct

    data = struct.pack(f"<{len(keys)}q", *[int(k) & 0x7FFFFFFFFFFFFFFF for k in keys])
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def test_rand_stream_equals_the_hash_it_replaces():
    """The shuffle / mix / shard-order decisions must stay the same function of (seed, stream,
    counter): the data order (and the golden losses) depend on it."""
    rng = np.random.default_rng(2)
    for _ in range(200):
        prefix = [int(x) for x in rng.integers(-2**62, 2**62, int(rng.integers(1, 7)))]
        stream = worker_stream._RandStream(*prefix)
        for c in (0, 1, int(rng.integers(0, 2**62))):
            assert stream(c) == worker_stream._rand_u64(*prefix, c) == _rand_u64_reference(*prefix, c)


def _collate_reference(samples, pad_id=0, seq_len=None):
    """The per-row collator the vectorised one replaced."""

    def doc_ids_from_starts(starts, length):
        marks = np.zeros(length, dtype=np.int64)
        marks[np.asarray(starts[1:], dtype=np.int64)] = 1
        return np.cumsum(marks)

    lens = [int(np.asarray(s["input_ids"]).shape[0]) for s in samples]
    T = seq_len if seq_len is not None else max(lens)
    B = len(samples)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.bool_)
    docs = np.zeros((B, T), dtype=np.int64)
    for b, (s, n) in enumerate(zip(samples, lens)):
        ids[b, :n] = s["input_ids"]
        mask[b, :n] = np.asarray(s["loss_mask"]).astype(np.bool_)
        d = doc_ids_from_starts(np.asarray(s.get("doc_starts", [0])), n)
        docs[b, :n] = d
        docs[b, n:] = d[-1] + 1
    return {"input_ids": ids, "loss_mask": mask, "doc_ids": docs, "meta": [s["meta"] for s in samples]}


def test_collate_equals_the_per_row_reference():
    from megasleep.data.sample import collate

    rng = np.random.default_rng(3)
    for trial in range(200):
        samples, _ = _random_block(rng, int(rng.integers(1, 9)))
        if trial % 3 == 0:  # lists, as a packed row's leftover carries them
            samples = [{**s, "input_ids": s["input_ids"].tolist(), "doc_starts": s["doc_starts"].tolist()} for s in samples]
        if trial % 5 == 0:
            del samples[0]["doc_starts"]
        seq_len = None if trial % 2 else 12
        got, want = collate(samples, 7, seq_len), _collate_reference(samples, 7, seq_len)
        for k in ("input_ids", "loss_mask", "doc_ids"):
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), (trial, k)
        assert got["meta"] == want["meta"]


def test_verify_reads_blocks_names_bad_samples_and_truncated_shards(k16, tmp_path, monkeypatch):
    from megasleep.data.errors import ShardMismatchError

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def edit(key, s):
        return {**s, "input_ids": s["input_ids"] * 0 - 1} if key == "train-000000003" else s

    bad = rewrite_dataset(k16, tmp_path / "bad", block_samples=16, edit=edit, shards=[0])
    with pytest.raises(ShardMismatchError, match=r"shard-000000\.tar: 1 samples fail validation"):
        verify_dataset(bad, read_samples=True)
    cut = rewrite_dataset(k16, tmp_path / "cut", block_samples=16, shards=[])
    data = (cut / "shard-000001.tar").read_bytes()
    (cut / "shard-000001.tar").write_bytes(data[: len(data) // 3])  # inside a member: tarfile fails
    with pytest.raises(ShardMismatchError) as e:
        shard_counts(cut / "shard-000001.tar")
    msg = str(e.value)
    assert msg.count("unreadable shard") == 1 and "shard-000001.tar" in msg and "\n" not in msg
    (cut / "shard-000001.tar").write_bytes(data[: len(data) // 2])  # at a member boundary: reads as short
    assert shard_counts(cut / "shard-000001.tar")["samples"] < 40
