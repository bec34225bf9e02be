"""The one scorer and the one collator: unit semantics of ``score_batch``, the intervals, the padding
rule shared by every batch builder, and the acceptance test that the trainer's evaluation, a study
table and ``megasleep eval`` report the same number for multi-query Depo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megasleep.data.sample import collate, make_sample
from megasleep.eval.harness import EvalSettings, Tally, score_batch, summarize
from megasleep.eval.scoring import wilson
from megasleep.sleep import SleepConfig, SleepOutput
from tests.train.helpers import pythonpath

ROOT = Path(__file__).resolve().parents[2]


def _fixed_forward(preds: torch.Tensor, ce: torch.Tensor):
    """A forward whose greedy predictions and per-position CE are given (what CollectingRunner returns)."""

    def forward(ids, mask, docs, cfg):
        n = int(mask[:, 1:].sum())
        return SleepOutput(loss=torch.zeros(()), loss_sum=torch.zeros(()), n_tokens=n, window_loss_sum=torch.zeros(1),
                           window_tokens=[n], passes=cfg.passes, passes_used=[1], forwards=1,
                           extras={"predictions": preds, "target_ce": ce})

    return forward


def test_score_batch_counts_units_not_samples():
    """Depo-like sample: 3 queries of 2 answer tokens; the prediction at p-1 is scored against token p.
    Queries 1 and 3 are right, query 2 has one wrong token: 2 correct units of 3 (the sample as a whole
    is wrong, which is what a per-sample accuracy would have counted)."""
    ids = np.arange(12) + 10
    queries = [{"positions": [2, 3]}, {"positions": [6, 7]}, {"positions": [10, 11]}]
    meta = {"task": "depo", "difficulty": 2, "answer": "x", "answer_positions": [2, 3, 6, 7, 10, 11],
            "queries": queries}
    sample = make_sample(ids, [0] * 2 + [1] * 10, meta)
    other = make_sample(np.arange(6) + 10, [0, 0, 1, 1, 1, 1],
                        {"task": "depo", "difficulty": 2, "answer": "y", "answer_positions": [4, 5]})
    batch = collate([sample, other], pad_id=0)
    preds = torch.full((2, 12), -1)
    preds[0, :11] = torch.as_tensor(ids[1:])  # every next token right ...
    preds[0, 6] = 0                           # ... except the first answer token of query 2
    preds[1, :5] = torch.as_tensor(np.arange(6)[1:] + 10)
    ce = torch.zeros(2, 12)
    ce[0, [1, 2, 5, 6, 9, 10]] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    tally = Tally()
    score_batch(_fixed_forward(preds, ce), batch, [7, 8], SleepConfig(window=12, passes=2), tally,
                torch.device("cpu"))
    a, b = tally.records
    assert (a["index"], a["units"], a["correct"], a["unit_correct"]) == (7, 3, 2, [1, 0, 1])
    assert a["answer_loss_sum"] == pytest.approx(2.1) and a["answer_tokens"] == 6
    assert (b["units"], b["correct"]) == (1, 1)
    res = summarize(tally, EvalSettings(eval_passes=[2], window=12, bootstrap=200), 2, "depo")
    o = res["overall"]
    assert (o["correct"], o["n_units"], o["n_samples"]) == (3, 4, 2) and o["accuracy"] == 0.75
    assert (o["wilson_low"], o["wilson_high"]) == pytest.approx(wilson(3, 4))
    assert o["ci_low"] <= 0.75 <= o["ci_high"]
    assert res["buckets"][0]["difficulty"] == 2 and res["buckets"][0]["n_units"] == 4


def test_one_collator_padding_is_a_document_of_its_own(tmp_path):
    """The loader, the task stream and evaluation all build batches with ``collate``; padding gets a
    doc id one past the sample's last document, never sharing a document with a real token."""
    two_docs = make_sample([5, 6, 7, 8], [0, 1, 0, 1], {"task": "t", "difficulty": 0, "answer": "",
                                                          "answer_positions": []}, doc_starts=[0, 2])
    short = make_sample([5, 6], [0, 1], {"task": "t", "difficulty": 0, "answer": "", "answer_positions": []})
    b = collate([two_docs, short], pad_id=3, seq_len=6)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 3, 3], [5, 6, 3, 3, 3, 3]]
    assert b["doc_ids"].tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 1, 1]]
    assert b["loss_mask"].tolist() == [[False, True, False, True, False, False], [False, True] + [False] * 4]
    with pytest.raises(ValueError, match="seq_len=3"):
        collate([two_docs], seq_len=3)
    from megasleep.eval.data import batches

    (idx, eb), = batches([short, two_docs], 2, pad_id=3)
    assert idx == [0, 1] and eb["doc_ids"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    from megasleep.train.data import TaskStream, task_tokenizer

    tok = task_tokenizer("rule110", tmp_path, 0, lambda: None)
    ts = TaskStream("rule110", tok, seed=0, split="train", difficulty="0-3", params={}, micro_batch=3,
                    global_batch=3, rank=0, world=1)
    got = ts.batches(0)[0]
    want = collate([ts.sample(i) for i in range(3)], tok.pad_id)
    for k in ("input_ids", "loss_mask", "doc_ids"):
        assert np.array_equal(got[k].numpy(), want[k]), k


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=pythonpath(), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


@pytest.mark.slow
def test_trainer_study_table_and_megasleep_eval_agree_on_multi_query_depo(tmp_path):
    """Same model, N and samples: the trainer's evaluation (eval.json), the study table built from it
    and ``megasleep eval`` on the exported checkpoint report the same unit counts, accuracy and loss."""
    from megasleep.study.report import cell, counts, results_of

    run = tmp_path / "run"
    params = "{n_min: 4, n_max: 8, n_queries: 4, graph_len: 40}"
    train = [sys.executable, "-m", "megasleep.cli", "train", "configs/experiments/tiny-demo.yaml", f"run_dir={run}",
             "data.task.name=depo", f"data.task.params={params}", "data.task.difficulty=2", "sleep.window=24",
             "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4", "optim.warmup_steps=1",
             "checkpoint.every=0", "checkpoint.resume=never", "eval.eval_passes=[1,2]", "eval.samples=12",
             "eval.batch_size=4", "logging.tensorboard=false", "logging.progress=false"]
    p = subprocess.run(train, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    trained = {r["passes"]: r for r in json.loads((run / "eval.json").read_text())["results"]}
    out = tmp_path / "eval"
    ev = [sys.executable, "-m", "megasleep.cli", "eval", "--checkpoint", str(run / "export"), "--task", "depo",
          "--split", "val", "--difficulty", "2", "--n-examples", "12", "--seed", "0", "--eval-passes", "1,2",
          "--batch-size", "4", "--no-plots", "--no-progress", "--out", str(out)]
    for kv in ("n_min=4", "n_max=8", "n_queries=4", "graph_len=40"):
        ev += ["--task-param", kv]
    p = subprocess.run(ev, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    evaluated = {r["passes"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    study = results_of({"eval": list(trained.values())})
    for n in (1, 2):
        a, b = trained[n]["overall"], evaluated[n]["overall"]
        assert (a["n_samples"], a["n_units"]) == (b["n_samples"], b["n_units"]) == (12, 48)
        assert a["correct"] == b["correct"] and a["accuracy"] == b["accuracy"]
        assert a["answer_loss"] == pytest.approx(b["answer_loss"], rel=1e-5)
        assert trained[n]["loss"] == pytest.approx(evaluated[n]["loss"], rel=1e-5)
        assert counts(study[n]) == (b["correct"], b["n_units"])
        assert cell(*counts(study[n])) == cell(b["correct"], b["n_units"])
    # `megasleep eval compare` reads the training run's eval.json like a results directory
    from megasleep.eval.report import compare_rows, read_results

    _, rows = compare_rows([read_results(run), read_results(out)])
    acc = [r for r in rows if r[1] == "accuracy" and r[2] == "all"]
    assert len(acc) == 2 and all(r[3] == r[4] != "-" for r in acc)


@pytest.mark.slow
def test_validator_under_zero3_two_ranks_equals_one_rank(tmp_path):
    """The trainer's evaluation through a ZeRO-3 engine on 2 ranks (each scoring half the samples,
    one all-gather) reports the samples, units and counts of a 1-rank run of the same model."""
    common = ["configs/experiments/tiny-demo.yaml", "deepspeed.zero_stage=3", "train.steps=2",
              "train.global_batch_size=8", "train.micro_batch_size=4", "optim.warmup_steps=1", "checkpoint.every=0",
              "checkpoint.resume=never", "checkpoint.export=false", "eval.eval_passes=[1,2]", "eval.samples=24",
              "eval.batch_size=4", "logging.tensorboard=false", "logging.progress=false"]
    evals = {}
    for ranks in (1, 2):
        run = tmp_path / f"r{ranks}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
               "megasleep.train.cli", *common, f"run_dir={run}"]
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        evals[ranks] = json.loads((run / "eval.json").read_text())["results"]
    for a, b in zip(evals[1], evals[2]):
        assert a["passes"] == b["passes"] and a["n_examples"] == b["n_examples"] == 24
        assert (a["overall"]["n_units"], a["overall"]["n_samples"]) == (b["overall"]["n_units"], 24)
        assert a["overall"]["correct"] == b["overall"]["correct"]
        assert [x["n_units"] for x in a["buckets"]] == [x["n_units"] for x in b["buckets"]]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        # collapse diagnostics (eval.diagnostics) measured on the plain model inside GatheredParameters
        assert b["diagnostics"]["diag/passes"] == b["passes"] and math.isfinite(b["diagnostics"]["diag/loss"])
