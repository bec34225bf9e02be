"""Resumable loader: split by rank x worker, exact resume, mixing, packing, bad data, early failures."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

from megasleep.data.errors import BadDataError, MissingShardError, TokenizerMismatchError
from megasleep.data.loader import build_loader
from megasleep.data.manifest import check_tokenizer_hash, read_manifest
from tests.data.shard_tools import all_keys, shard_samples, write_shard


def run(loader, limit=None):
    """Consume ``limit`` batches (all if None); returns a list of (keys, input_ids, loss_mask, doc_ids)."""
    out = []
    for b in loader:
        out.append(([m.get("_key") or tuple(p["_key"] for p in m["packed"]) for m in b["meta"]],
                    b["input_ids"].clone(), b["loss_mask"].clone(), b["doc_ids"].clone()))
        if limit is not None and len(out) >= limit:
            break
    return out


def same(a, b) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and all(torch.equal(p, q) for p, q in zip(x[1:], y[1:]))
                                    for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- coverage
def test_two_ranks_two_workers_each_sample_once_per_epoch(r110_data):
    out, _ = r110_data
    train = out / "train"
    expected = sorted(all_keys(train))
    cfg = {"datasets": [str(train)], "batch_size": 8, "num_workers": 2, "shuffle_buffer": 16, "seed": 1}
    # a finite epoch: the union over ranks is the dataset, each sample exactly once
    seen = []
    for rank in (0, 1):
        keys = [k for batch in run(build_loader({**cfg, "epochs": 1}, rank=rank, world_size=2)) for k in batch[0]]
        assert len(keys) == len(set(keys)) == 160
        seen += keys
    assert sorted(seen) == expected
    # repeating forever: every epoch, counted by the epoch tag, covers the dataset exactly once
    by_epoch: dict[int, list] = {0: [], 1: []}
    for rank in (0, 1):
        for b in build_loader(cfg, rank=rank, world_size=2):
            for m in b["meta"]:
                if m["_epoch"] in by_epoch:
                    by_epoch[m["_epoch"]].append(m["_key"])
            if all(m["_epoch"] >= 2 for m in b["meta"]) and len(by_epoch[1]) >= 160 * (rank + 1):
                break
    assert sorted(by_epoch[0]) == expected and sorted(by_epoch[1]) == expected
    assert by_epoch[0] != by_epoch[1]  # reshuffled per epoch


def test_seeded_shuffle(r110_data):
    train = r110_data[0] / "train"
    cfg = {"datasets": [str(train)], "batch_size": 10, "num_workers": 0, "epochs": 1, "shuffle_buffer": 30}
    a = run(build_loader({**cfg, "seed": 5}))
    assert same(a, run(build_loader({**cfg, "seed": 5})))
    assert [x[0] for x in a] != [x[0] for x in run(build_loader({**cfg, "seed": 6}))]
    plain = run(build_loader({**cfg, "shuffle_buffer": 0, "shuffle_shards": False}))
    assert [k for b in plain for k in b[0]] == all_keys(train)  # no shuffle: file order


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 3])
def test_resume_equals_uninterrupted(r110_data, workers):
    """Stop after K batches, save the state (through JSON, as in a checkpoint), resume in a new loader:
    the rest is exactly what the uninterrupted run produced. 3 workers get 3/3/2 shards, so they run
    out at different times; 2 epochs cross an epoch boundary."""
    train = r110_data[0] / "train"
    cfg = {"datasets": [str(train)], "batch_size": 7, "num_workers": workers, "shuffle_buffer": 25, "seed": 11,
           "epochs": 2}
    full = run(build_loader(cfg))
    assert sum(len(b[0]) for b in full) == 640
    for k in ([5, 23, len(full) - 1] if workers else [0, 13, 50, len(full)]):
        first = build_loader(cfg)
        head = run(first, limit=k) if k else []
        state = json.loads(json.dumps(first.state_dict()))
        resumed = build_loader(cfg)
        resumed.load_state_dict(state)
        assert same(head + run(resumed), full), f"resume after {k} batches differs"


def test_resume_mixing_infinite_two_ranks(r110_data, tmp_path, r110_tok, depo_tok):
    from megasleep.data.shards import build_task_split

    short = build_task_split("rule110", tmp_path / "short", "train", 60, seed=0, difficulties="1-4",
                             tokenizer=r110_tok.path, shard_size=15, progress=False, params={"width": 8})
    assert short["num_samples"] == 60
    cfg = {"datasets": [{"path": str(r110_data[0] / "train"), "weight": 3.0, "name": "r110"},
                        {"path": str(tmp_path / "short"), "weight": 1.0, "name": "short"}],
           "batch_size": 8, "num_workers": 2, "shuffle_buffer": 10, "seed": 2}
    for rank in (0, 1):
        full = run(build_loader(cfg, rank, 2), limit=40)
        first = build_loader(cfg, rank, 2)
        head = run(first, limit=17)
        resumed = build_loader(cfg, rank, 2)
        resumed.load_state_dict(first.state_dict())
        assert same(head + run(resumed, limit=23), full)
    counts: Counter = Counter()
    for i, b in enumerate(build_loader({**cfg, "num_workers": 0}, 0, 2)):
        counts.update(m["_dataset"] for m in b["meta"])
        if i == 59:
            break
    frac = counts["r110"] / sum(counts.values())
    assert 0.68 < frac < 0.82, counts  # weights 3:1
    # datasets made with different tokenizers cannot be mixed
    depo = build_task_split("depo", tmp_path / "depo", "train", 4, seed=0, difficulties="1", tokenizer=depo_tok.path,
                            shard_size=2, progress=False, params={"n_max": 20})
    assert depo["num_samples"] == 4
    with pytest.raises(TokenizerMismatchError, match="different tokenizers"):
        build_loader({"datasets": [str(r110_data[0] / "train"), str(tmp_path / "depo")]})


def test_pack_rows_and_resume(tmp_path, text_corpus, text_tok):
    from megasleep.data.shards import build_text_dataset

    m = build_text_dataset(text_corpus / "a.jsonl", tmp_path / "cut", text_tok.path, 96, mode="cut",
                           text_field="body", shard_size=10, progress=False)
    cfg = {"datasets": [str(tmp_path / "cut")], "batch_size": 4, "seq_len": 48, "pack": True, "num_workers": 2,
           "shuffle_buffer": 8, "seed": 0, "epochs": 1}
    full = run(build_loader(cfg))
    pad = text_tok.pad_id
    total = 0
    for _keys, ids, mask, doc in full:
        assert ids.shape[1] == 48
        for row in range(ids.shape[0]):
            n = int((doc[row] <= doc[row].max() - 1).sum()) if bool((ids[row] == pad).any()) else 48
            total += n
            assert not mask[row, 0] and not mask[row, n:].any()
    assert total == m["num_tokens"]  # every token packed exactly once
    for k in (3, 9):
        first = build_loader(cfg)
        head = run(first, limit=k)
        resumed = build_loader(cfg)
        resumed.load_state_dict(first.state_dict())
        assert same(head + run(resumed), full)


def test_state_dict_rejects_other_layout(r110_data):
    cfg = {"datasets": [str(r110_data[0] / "train")], "num_workers": 0}
    st = build_loader(cfg).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        build_loader({**cfg, "num_workers": 2}).load_state_dict(st)
    with pytest.raises(ValueError, match="different data config"):
        build_loader({**cfg, "seed": 9}).load_state_dict(st)


# ---------------------------------------------------------------------------------------------- batches
def test_padding_doc_ids_and_meta(tmp_path, text_corpus, text_tok):
    from megasleep.data.shards import build_text_dataset

    build_text_dataset(text_corpus / "a.jsonl", tmp_path / "t", text_tok.path, 200, mode="cut", text_field="body",
                       shard_size=100, progress=False)
    b = next(iter(build_loader({"datasets": [str(tmp_path / "t")], "batch_size": 6, "num_workers": 0,
                                "shuffle_buffer": 0, "shuffle_shards": False})))
    assert b["input_ids"].dtype == torch.long and b["loss_mask"].dtype == torch.bool and b["doc_ids"].dtype == torch.long
    lengths = [int(m["docs"] and len(text_tok.encode(
        json.loads((text_corpus / "a.jsonl").read_text().splitlines()[m["docs"][0][1]])["body"])) + 2) for m in b["meta"]]
    assert b["input_ids"].shape == (6, max(lengths))
    for r, n in enumerate(lengths):
        assert (b["input_ids"][r, n:] == text_tok.pad_id).all() and not b["loss_mask"][r, n:].any()
        assert b["loss_mask"][r, 1:n].all() and not b["loss_mask"][r, 0]
        assert (b["doc_ids"][r, :n] == 0).all() and (b["doc_ids"][r, n:] == 1).all()
    fixed = next(iter(build_loader({"datasets": [str(tmp_path / "t")], "batch_size": 6, "num_workers": 0,
                                    "seq_len": 256, "shuffle_buffer": 0})))
    assert fixed["input_ids"].shape == (6, 256)


def test_task_batch_answer_positions(r110_data):
    b = next(iter(build_loader({"datasets": [str(r110_data[0] / "val")], "batch_size": 5, "num_workers": 0})))
    for r, m in enumerate(b["meta"]):
        assert torch.nonzero(b["loss_mask"][r]).flatten().tolist() == m["answer_positions"] == [97, 98, 99, 100]
        assert m["task"] == "rule110" and 1 <= m["difficulty"] <= 8


# ---------------------------------------------------------------------------------------------- bad data
def _rewrite(src, dst, edit):
    """Copy shard ``src`` to ``dst`` passing every member through ``edit(name, bytes) -> (name, bytes)|None``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for mem in tin.getmembers():
            r = edit(mem.name, tin.extractfile(mem).read())
            if r is None:
                continue
            ti = tarfile.TarInfo(r[0])
            ti.size = len(r[1])
            tout.addfile(ti, io.BytesIO(r[1]))


@pytest.fixture
def damaged(tmp_path, r110_data):
    """A copy of the 8-shard train split with 4 damaged shards + 1 malformed sample."""
    d = tmp_path / "bad"
    shutil.copytree(r110_data[0] / "train", d)
    (d / "shard-000001.tar").write_bytes(np.random.default_rng(0).bytes(20000))  # corrupt
    data = (d / "shard-000002.tar").read_bytes()
    (d / "shard-000002.tar").write_bytes(data[: len(data) // 2 + 100])  # truncated mid-member
    _rewrite(r110_data[0] / "train/shard-000003.tar", d / "shard-000003.tar",  # wrong keys
             lambda n, b: (n.replace("input_ids.npy", "tokens.npy"), b))
    (d / "shard-000004.tar").write_bytes(b"")  # empty file

    samples = shard_samples(r110_data[0] / "train/shard-000005.tar")  # one block of 40
    bad = samples[5][1]
    assert samples[5][0] == "train-000000205"
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][0] = 1  # sample 5 of the block: loss_mask[0] = 1
    write_shard(d / "shard-000005.tar", samples)
    assert (d / "shard-000005.tar").stat().st_size == (r110_data[0] / "train/shard-000005.tar").stat().st_size
    return d


def test_bad_shards_skipped_counted_and_warned(damaged):
    good_shards = [0, 5, 6, 7]
    cfg = {"datasets": [str(damaged)], "batch_size": 8, "num_workers": 0, "epochs": 1, "max_bad_fraction": 0.5}
    loader = build_loader(cfg)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        keys = [k for b in run(loader) for k in b[0]]
    msgs = " ".join(str(x.message) for x in w)
    for k in (1, 2, 3, 4):
        assert f"shard-00000{k}.tar" in msgs
    expected = {f"train-{i:09d}" for s in good_shards for i in range(40 * s, 40 * s + 40)} - {"train-000000205"}
    assert expected <= set(keys) and len(keys) == len(set(keys))
    extra = set(keys) - expected  # only complete samples of the truncated shard may get through
    assert all(80 <= int(k.split("-")[1]) < 120 for k in extra) and len(extra) < 40
    # counters (read mid-run: a finished finite run starts a fresh state)
    loader2 = build_loader(cfg)
    it = iter(loader2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(len(keys) // 8):
            next(it)
        stats = loader2.stats()
    assert stats["assigned"] == 8 and stats["bad_shards"] == 3  # corrupt, truncated, empty: one verdict each
    assert stats["bad_samples"] >= 41  # 40 renamed-key samples + the bad loss mask
    assert {f"shard-00000{k}.tar" for k in (1, 2, 3, 4, 5)} == {n.rsplit("/", 1)[1] for n in stats["bad_shard_names"]}


def test_bad_fraction_stops_naming_shards(damaged):
    cfg = {"datasets": [str(damaged)], "batch_size": 8, "num_workers": 2, "epochs": 1, "max_bad_fraction": 0.2}
    with pytest.raises(BadDataError, match=r"shard-00000[1-4]\.tar"):
        run(build_loader(cfg))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shards_after_the_last_full_batch_are_checked_and_counted(r110_data, tmp_path, workers):
    """A finite epoch whose last shards are corrupt: they are read after the last full batch, yet they
    count toward ``max_bad_fraction`` (2 of 8 > 0.1: the run stops naming them) and show in the stats."""
    d = tmp_path / "tail"
    shutil.copytree(r110_data[0] / "train", d)
    for k in (6, 7):
        (d / f"shard-00000{k}.tar").write_bytes(np.random.default_rng(k).bytes(20000))
    cfg = {"datasets": [str(d)], "batch_size": 8, "num_workers": workers, "epochs": 1, "shuffle_shards": False,
           "shuffle_buffer": 0, "warn_bad": False}
    with pytest.raises(BadDataError, match=r"shard-00000[67]\.tar"):
        run(build_loader({**cfg, "max_bad_fraction": 0.1}))
    loader = build_loader({**cfg, "max_bad_fraction": 0.5})
    assert len(run(loader)) == 6 * 40 // 8
    stats = loader.stats()  # after the finished epoch
    assert stats["bad_shards"] == 2 and stats["assigned"] == 8
    assert sorted(n.rsplit("/", 1)[1] for n in stats["bad_shard_names"]) == ["shard-000006.tar", "shard-000007.tar"]
    run(loader)  # the next epoch adds its own counts, once
    assert (loader.stats()["bad_shards"], loader.stats()["assigned"]) == (4, 16)


def test_missing_shard_empty_glob_fail_early(r110_data, tmp_path):
    d = tmp_path / "miss"
    shutil.copytree(r110_data[0] / "val", d)
    (d / "shard-000001.tar").unlink()
    with pytest.raises(MissingShardError, match="shard-000001.tar"):
        build_loader({"datasets": [str(d)]})
    with pytest.raises(MissingShardError, match="no shard matches"):
        build_loader({"datasets": [str(tmp_path / "nothing" / "*.tar")]})
    with pytest.raises(MissingShardError, match="shard-000002.tar"):
        build_loader({"datasets": [str(r110_data[0] / "val" / "shard-{000000..000003}.tar")]})
    with pytest.raises(MissingShardError, match="manifest not found"):
        build_loader({"datasets": [str(tmp_path / "nowhere/manifest.json")]})
    # a glob / brace pattern of existing shards works and finds the manifest next to them
    ok = build_loader({"datasets": [str(r110_data[0] / "val" / "shard-{000000..000001}.tar")], "num_workers": 0,
                       "epochs": 1})
    assert sum(len(b["meta"]) for b in ok) > 0


def test_url_scheme_through_webdataset(r110_data):
    shard = r110_data[0] / "val" / "shard-000000.tar"
    loader = build_loader({"datasets": [f"pipe:cat {shard}"], "num_workers": 0, "epochs": 1, "batch_size": 16})
    assert sorted(m["_key"] for b in loader for m in b["meta"]) == [f"val-{i:09d}" for i in range(40)]


def test_tokenizer_mismatch_fails_early(r110_data, r110_tok, depo_tok):
    val = r110_data[0] / "val"
    with pytest.raises(TokenizerMismatchError) as e:
        build_loader({"datasets": [str(val)], "tokenizer_hash": depo_tok.hash})
    msg = str(e.value)
    assert str(val / "manifest.json") in msg and depo_tok.hash in msg and r110_tok.hash in msg
    build_loader({"datasets": [str(val)], "tokenizer_hash": r110_tok.hash})
    check_tokenizer_hash(val, r110_tok.hash)
    check_tokenizer_hash(read_manifest(val), r110_tok.hash)
    with pytest.raises(TokenizerMismatchError):
        check_tokenizer_hash(val / "manifest.json", "0" * 64)


def test_too_long_sample_is_bad(r110_data):
    cfg = {"datasets": [str(r110_data[0] / "val")], "seq_len": 50, "num_workers": 0, "warn_bad": False}
    with pytest.raises(BadDataError, match="seq_len"):
        run(build_loader(cfg))


def test_import_does_not_load_torch():
    code = ("import sys; import megasleep.data, megasleep.data.loader, megasleep.data.tasks, megasleep.data.shards, "
            "megasleep.data.tokenizer, megasleep.data.manifest; "
            "assert 'torch' not in sys.modules and 'webdataset' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
