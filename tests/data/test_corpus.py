"""Corpus readers: directories and globs of any common kind, what was read and skipped (and why),
long documents kept whole through the shards, and `megasleep data text` from a folder to a config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megasleep.data.corpus import corpus_report, iter_documents, scan_corpus
from megasleep.data.errors import MissingShardError

LONG = "".join(f"def f{i}(x):\n    return x + {i}  # line {i}\n\n" for i in range(400))


@pytest.fixture
def mixed(tmp_path):
    d = tmp_path / "mixed"
    (d / "src" / "__pycache__").mkdir(parents=True)
    (d / "docs").mkdir()
    (d / "src" / "long.py").write_text(LONG)
    (d / "src" / "__pycache__" / "long.cpython-311.pyc").write_bytes(b"\0\1")
    (d / "docs" / "guide.md").write_text("# Guide\n\n    indented code\n")
    (d / "docs" / "api.rst").write_text("API\n===\n\n.. note:: text\n")
    (d / "notes.txt").write_text("plain\n\nparagraphs\n")
    (d / "README").write_text("no suffix, but text\n")
    (d / "blob").write_bytes(b"\x00\x01binary")
    (d / "lib.so").write_bytes(b"\x7fELF")
    (d / "empty.py").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}\n  kept"}) + "\n" for i in range(3))
                                  + json.dumps({"other": 1}) + "\n")
    return d


def test_directory_of_mixed_kinds_read_and_skipped_with_reasons(mixed):
    stats: dict = {}
    with pytest.warns(UserWarning, match="no string field 'text'"):
        docs = list(iter_documents(mixed, stats=stats))
    by_file = {}
    for doc in docs:
        by_file.setdefault(doc.source.rsplit("/", 1)[1], []).append(doc.text)
    assert set(by_file) == {"long.py", "guide.md", "api.rst", "notes.txt", "README", "rows.jsonl"}
    assert by_file["long.py"] == [LONG]  # one document, whole, newlines and indentation kept
    assert by_file["rows.jsonl"] == [f"row {i}\n  kept" for i in range(3)]
    assert stats["documents"] == 8 and stats["bytes"] == sum(len(t.encode()) for t in (d.text for d in docs))
    assert stats["files_read"] == 6 and stats["skipped"] == 1
    skipped = {r: sorted(p.rsplit("/", 2)[-1] for p in ps) for r, ps in stats["skipped_files"].items()}
    assert skipped == {"binary or of unknown kind": ["blob", "lib.so"], "empty": ["empty.py"],
                       "cache or version-control directory": [""], "not UTF-8 text": ["latin1.txt"]}
    report = "\n".join(corpus_report(stats))
    assert "read 6 files" in report and "8 documents" in report and "latin1.txt" in report and "blob" in report


def test_globs_files_and_errors(mixed, tmp_path):
    assert [p.rsplit("/", 1)[1] for p in scan_corpus(str(mixed / "**" / "*.py")).paths] == ["long.py"]
    assert scan_corpus(mixed / "README").paths == [str(mixed / "README")]
    with pytest.raises(MissingShardError, match="no file matches"):
        scan_corpus(str(tmp_path / "*.nothing"))
    with pytest.raises(MissingShardError, match="not found"):
        scan_corpus(tmp_path / "missing")
    (tmp_path / "only_binary").mkdir()
    (tmp_path / "only_binary" / "x.so").write_bytes(b"\0")
    with pytest.raises(MissingShardError, match="holds no readable corpus file .*1 binary"):
        scan_corpus(tmp_path / "only_binary")


def test_parquet_and_datasets_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha\n  beta", "gamma"]}), tmp_path / "a.parquet")
    assert [d.text for d in iter_documents(tmp_path / "a.parquet", text_field="body")] == ["alpha\n  beta", "gamma"]
    datasets = pytest.importorskip("datasets", reason="reading .arrow / save_to_disk needs `datasets`")
    ds = datasets.Dataset.from_dict({"text": ["one\n  two", "three"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    stats: dict = {}
    assert [d.text for d in iter_documents(tmp_path / "saved", stats=stats)] == ["one\n  two", "three"]
    assert stats["scan"].files == [(str(tmp_path / "saved"), "datasets")]


def test_long_document_reaches_the_shards_whole_with_its_boundaries(tmp_path, mixed):
    """A document of many sequences: packed, its tokens in order across sequences, one start recorded."""
    from megasleep.data.block import read_shard
    from megasleep.data.sample import MalformedSample
    from megasleep.data.shards import build_text_dataset
    from megasleep.data.tokenizer import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok", corpus=mixed, vocab_size=400, hard_vocab_limit=False, num_threads=1)
    want = [tok.bos_id, *tok.encode(LONG), tok.eos_id]
    T = 256
    assert len(want) > 4 * T
    m = build_text_dataset(mixed / "src" / "long.py", tmp_path / "shards", tok.path, T, progress=False)
    samples = [s for _, s in read_shard(tmp_path / "shards" / m["shards"][0]["name"])]
    assert not any(isinstance(s, MalformedSample) for s in samples)
    ids = np.concatenate([s["input_ids"] for s in samples]).tolist()
    assert ids == want and tok.decode(ids[1:-1]) == LONG
    assert all(len(s["input_ids"]) == T for s in samples[:-1])
    assert [s["doc_starts"].tolist() for s in samples] == [[0]] * len(samples)  # continuation: no new start
    assert m["documents"] == 1 and m["document_bytes"] == len(LONG.encode())


def test_megasleep_data_text_from_a_folder_to_a_config(tmp_path, mixed, capsys):
    from megasleep.cli import main
    from megasleep.data.manifest import read_manifest
    from megasleep.data.tokenizer import load_tokenizer
    from megasleep.train.config import load_experiment

    out = tmp_path / "out"
    rc = main(["data", "text", "--input", str(mixed), "--out", str(out), "--vocab-size", "400", "--seq-len", "128",
               "--window", "64", "--val-every", "4", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "read 6 files" in err and "experiment config" in err
    tok = load_tokenizer(out / "tokenizer" / "text.model")
    cfg = load_experiment(out / "experiment.yaml")
    assert cfg.model_cfg.vocab_size == tok.vocab_size
    assert (cfg.sleep.window, cfg.data.loader.seq_len) == (64, 128)
    train, val = read_manifest(out / "train"), read_manifest(out / "val")
    assert train["documents"] + val["documents"] == 8 and val["documents"] == 2  # documents 3 and 7
    assert train["tokenizer"]["hash"] == val["tokenizer"]["hash"] == tok.hash
    # bad input: one line, exit code 2
    rc = main(["data", "text", "--input", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2 and "corpus input not found" in capsys.readouterr().err
