"""Importer of the official GSM-Infinite files, on small synthetic files in the published column layout
(problem, question, solution, op, id, template, mode, length, d; one parquet per ``ops_N`` split)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megasleep.data.errors import DataError
from megasleep.data.manifest import read_manifest
from megasleep.data.shards import import_gsm_official
from megasleep.data.tasks.gsm_official import parse_answer, row_to_sample


def official_rows(op: int, n: int, start: int = 0) -> list[dict]:
    rows = []
    for i in range(start, start + n):
        a, b = 3 + i, 5 + op
        rows.append({
            "problem": (f"The number of adult owls in Maple Creek equals {a}. The number of adult crows in Pine Ridge "
                        f"equals {b}. The number of adult foxes in Cedar Valley equals the sum of the number of adult "
                        f"owls in Maple Creek and the number of adult crows in Pine Ridge."),
            "question": "What is the number of adult foxes in Cedar Valley?",
            "solution": (f"Define adult owls in Maple Creek as x; so x = {a}. Define adult crows in Pine Ridge as y; "
                         f"so y = {b}. Define adult foxes as z; so z = x + y = {a + b}. Answer: {a + b}."),
            "op": op, "id": i, "template": "crazy_zootopia", "mode": "normalforward", "length": "0", "d": 2,
        })
    return rows


def test_parse_answer():
    assert parse_answer("... so z = 3 + 4 = 7. Answer: 7.") == 7
    assert parse_answer("Answer: 2. Wait. Answer: 12.") == 12
    with pytest.raises(ValueError):
        parse_answer("no answer here")


def test_import_parquet_and_jsonl(tmp_path, gsm_tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "official" / "data"
    src.mkdir(parents=True)
    for op in (2, 3):
        pq.write_table(pa.Table.from_pylist(official_rows(op, 5)), src / f"ops_{op}-00000-of-00001.parquet")
    with open(src / "igsm_op4_ip20_force_True_0.jsonl", "w") as f:
        for r in official_rows(4, 3):
            f.write(json.dumps(r) + "\n")
        bad = official_rows(4, 1, start=9)[0]
        bad["solution"] = "no final answer"  # unparsable: skipped + counted
        f.write(json.dumps(bad) + "\n")
    with pytest.warns(UserWarning, match="skipped"):
        m = import_gsm_official([str(src / "*.parquet"), str(src / "*.jsonl")], tmp_path / "out", gsm_tok.path,
                                shard_size=4, progress=False, max_skip_fraction=0.2)
    assert m["num_samples"] == 13 and m["rows"] == 14 and m["skipped_rows"] == 1
    assert m["difficulty"]["histogram"] == {"2": 5, "3": 5, "4": 3}
    assert read_manifest(tmp_path / "out")["tokenizer"]["hash"] == gsm_tok.hash
    # every sample: question first, then the context, then "Answer:" and the official answer
    from megasleep.data.block import read_shard

    n = 0
    for sh in m["shards"]:
        for _, s in read_shard(tmp_path / "out" / sh["name"], gsm_tok.vocab_size):
            meta = s["meta"]
            text = gsm_tok.decode(s["input_ids"].tolist())
            assert text.startswith("Question: What is the number of adult foxes in Cedar Valley?")
            assert text.index("Cedar Valley?") < text.index("The number of adult owls")
            assert gsm_tok.decode(s["input_ids"][meta["answer_positions"]].tolist()) == meta["answer"]
            a = 3 + meta["id"]
            assert int(meta["answer"]) == a + 5 + meta["difficulty"]
            assert meta["origin"] == "gsm-infinite" and meta["template"] == "crazy_zootopia"
            assert np.flatnonzero(s["loss_mask"]).tolist() == meta["answer_positions"]
            n += 1
    assert n == 13


def test_import_too_many_bad_rows_fails(tmp_path, gsm_tok):
    rows = official_rows(2, 4)
    for r in rows[:2]:
        del r["solution"]
    with open(tmp_path / "x.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="could not be imported"):
        import_gsm_official(tmp_path / "x.jsonl", tmp_path / "out", gsm_tok.path, progress=False)


def test_row_to_sample_max_len(gsm_tok):
    with pytest.raises(ValueError, match="max_len"):
        row_to_sample(official_rows(2, 1)[0], gsm_tok, max_len=10)
