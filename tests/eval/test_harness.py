"""`megasleep eval` end to end on tiny task / text shards: files and fields written, numbers checked
against independent computations (a constant-prediction model with known accuracy and loss; full-logit
forwards for the per-window losses and Depo's per-query units), GSM generation scoring, compare, and
the bad-input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megasleep.checkpoint.released import save_pretrained
from megasleep.cli import main
from megasleep.models import HybridLM
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


def _model(vocab, seed=0, **kw):
    torch.manual_seed(seed)
    return HybridLM(tiny_config("AGMA", vocab=vocab, **kw)).eval()


@pytest.fixture(scope="module")
def r110(tmp_path_factory):
    """A rule110 tokenizer, test shards (t in {0, 2}) and a random tiny checkpoint shipping the tokenizer."""
    from megasleep.data.shards import build_task_split
    from megasleep.data.tasks import get_task

    d = tmp_path_factory.mktemp("r110")
    tok = get_task("rule110").make_task_tokenizer(d / "tok")
    build_task_split("rule110", d / "shards", "test", 24, 3, "0,2", tok.path, shard_size=10, progress=False)
    ck = save_pretrained(_model(tok.vocab_size), d / "ck", tokenizer_path=tok.path,
                         sleep={"window": 24, "passes": 2, "eviction": "hard"})
    return dict(dir=d, tok=tok, shards=d / "shards", ck=ck)


def _run(*argv) -> int:
    return main(["eval", *map(str, argv), "--no-progress", "--bootstrap", "200"])


def test_eval_on_task_shards_writes_json_csv_png(r110, tmp_path):
    out = tmp_path / "res"
    assert _run("--checkpoint", r110["ck"], "--data", r110["shards"], "--eval-passes", "1,2,4", "--out", out) == 0
    for f in ("results.json", "buckets.csv", "windows.csv", "samples.jsonl", "accuracy_vs_passes.png",
              "accuracy_vs_difficulty.png", "loss_vs_window.png"):
        assert (out / f).is_file(), f
    for f in out.glob("*.png"):
        assert f.read_bytes()[:8] == PNG and f.stat().st_size > 5000
    doc = json.loads((out / "results.json").read_text())
    assert doc["format"] == "megasleep-eval"
    ck = doc["checkpoint"]
    assert ck["path"] == str(r110["ck"].resolve()) and ck["config"]["pattern"] == "AGMA" and ck["parameters"] > 0
    assert ck["sleep"] == {"window": 24, "passes": 2, "eviction": "hard"}
    data = doc["data"]
    assert data["kind"] == "task" and data["task"] == "rule110" and data["difficulty_name"] == "t"
    assert data["manifest_path"].endswith("manifest.json") and data["manifest"]["generator"].endswith("rule110")
    assert data["n_examples"] == 24
    assert doc["tokenizer"]["checkpoint"] == doc["tokenizer"]["data"] == r110["tok"].hash
    s = doc["settings"]
    assert s["eval_passes"] == [1, 2, 4] and s["window"] == 24 and s["eviction"] == "hard"  # from the checkpoint
    assert {"adaptive_tol", "batch_size", "bootstrap", "seed", "scoring", "max_examples", "device", "dtype"} <= set(s)
    assert [r["passes"] for r in doc["results"]] == [1, 2, 4]
    for r in doc["results"]:
        assert [b["difficulty"] for b in r["buckets"]] == [0, 2]
        assert sum(b["n_samples"] for b in r["buckets"]) == 24 == r["overall"]["n_units"]
        for b in r["buckets"] + [r["overall"]]:
            assert b["ci_low"] <= b["accuracy"] <= b["ci_high"] and b["answer_loss"] > 0
            assert b["wilson_low"] <= b["accuracy"] <= b["wilson_high"] and b["accuracy"] == b["correct"] / b["n_units"]
        # T = 101, L = 24: 5 windows; only the last holds the labels; N-1 sleeps before 4 evictions
        assert len(r["windows"]) == 5 and [w["tokens"] for w in r["windows"]] == [0, 0, 0, 0, 96]
        assert r["forwards"] == 2 * (5 + 4 * (r["passes"] - 1))  # 24 samples in 2 batches of <= 16
    header = (out / "buckets.csv").read_text().splitlines()[0]
    assert header.startswith("passes,difficulty_name,difficulty,n_samples,n_units,correct,accuracy,ci_low,ci_high,"
                             "wilson_low,wilson_high,answer_loss")
    assert s["chance"] == 0.5 ** 4  # Rule 110 with 4 labels: guessing every bit
    assert len((out / "samples.jsonl").read_text().splitlines()) == 3 * 24

    # --max-examples and compare
    out2 = tmp_path / "res2"
    assert _run("--checkpoint", r110["ck"], "--data", r110["shards"], "--eval-passes", "1", "--max-examples",
                "10", "--out", out2, "--no-plots") == 0
    assert json.loads((out2 / "results.json").read_text())["data"]["n_examples"] == 10
    assert main(["eval", "compare", str(out), str(out2), "--csv", str(tmp_path / "cmp.csv")]) == 0
    rows = (tmp_path / "cmp.csv").read_text().splitlines()
    assert rows[0] == "N,metric,key,[1],[2]"
    assert any(r.startswith("1,accuracy,all,") for r in rows) and any(r.startswith("4,accuracy,2,") for r in rows)


def _constant_model(vocab: int, token: int, scale: float = 0.1):
    """A model whose residual stream is the (identical) embedding of every token, so the head always
    gives the same logits: ``scale * d`` for ``token``, 0 elsewhere."""
    m = _model(vocab, tie_embeddings=False)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")):
                p.zero_()
        m.embed_tokens.weight.fill_(1.0)
        m.norm_f.weight.fill_(1.0)
        m.lm_head.weight.zero_()
        m.lm_head.weight[token] = scale
    return m


def test_accuracy_and_answer_loss_match_a_known_predictor(r110, tmp_path):
    tok = r110["tok"]
    one = tok.piece_to_id("1")
    d = 32
    ck = save_pretrained(_constant_model(tok.vocab_size, one), tmp_path / "const", tokenizer_path=tok.path)
    out = tmp_path / "res"
    assert _run("--checkpoint", ck, "--data", r110["shards"], "--eval-passes", "1,2", "--window", "24",
                "--out", out, "--no-plots") == 0
    doc = json.loads((out / "results.json").read_text())
    from megasleep.eval.data import read_shards

    samples, _, _ = read_shards(r110["shards"])
    logit = 0.1 * d  # rmsnorm(ones) = ones
    ce_one = math.log(math.exp(logit) + tok.vocab_size - 1) - logit
    ce_other = math.log(math.exp(logit) + tok.vocab_size - 1)
    for res in doc["results"]:
        for b in res["buckets"]:
            group = [s for s in samples if s["meta"]["difficulty"] == b["difficulty"]]
            want_acc = np.mean([s["meta"]["answer"] == "1111" for s in group])
            ones = sum(s["meta"]["answer"].count("1") for s in group)
            want_loss = (ones * ce_one + (4 * len(group) - ones) * ce_other) / (4 * len(group))
            assert b["accuracy"] == pytest.approx(want_acc, abs=1e-12)
            assert b["answer_loss"] == pytest.approx(want_loss, rel=1e-5)
    assert doc["results"][0]["overall"]["accuracy"] > 0  # the seed gives some all-ones answers


@pytest.fixture(scope="module")
def depo(tmp_path_factory):
    from megasleep.data.shards import build_task_split
    from megasleep.data.tasks import get_task

    d = tmp_path_factory.mktemp("depo")
    tok = get_task("depo").make_task_tokenizer(d / "tok")
    build_task_split("depo", d / "shards", "test", 4, 0, "1,2", tok.path, progress=False)
    ck = save_pretrained(_model(tok.vocab_size, seed=3), d / "ck", tokenizer_path=tok.path)
    return dict(tok=tok, shards=d / "shards", ck=ck)


def test_depo_scores_every_query_and_matches_full_logits(depo, tmp_path):
    out = tmp_path / "res"
    assert _run("--checkpoint", depo["ck"], "--data", depo["shards"], "--eval-passes", "2", "--window", "75",
                "--batch-size", "4", "--out", out, "--no-plots") == 0
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"][0]
    assert res["overall"]["n_units"] == 40 and res["overall"]["answer_tokens"] == 80
    from megasleep.checkpoint.load import load_pretrained
    from megasleep.eval.data import read_shards

    model = load_pretrained(depo["ck"])
    samples, _, _ = read_shards(depo["shards"])
    recs = {r["index"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
    total_ce = 0.0
    ids = torch.tensor(np.stack([s["input_ids"] for s in samples]), dtype=torch.long)  # all T = 360
    with torch.no_grad():
        all_logits = sleep_forward(model, ids, SleepConfig(window=75, passes=2), return_logits=True).logits
    for i, s in enumerate(samples):
        logits, pred = all_logits[i], all_logits[i].argmax(-1)
        correct = sum(all(int(pred[p - 1]) == int(ids[i, p]) for p in q["positions"]) for q in s["meta"]["queries"])
        assert recs[i]["correct"] == correct and recs[i]["units"] == 10
        pos = torch.tensor(s["meta"]["answer_positions"])
        ce = F.cross_entropy(logits[pos - 1], ids[i, pos], reduction="sum")
        assert recs[i]["answer_loss_sum"] == pytest.approx(float(ce), rel=1e-4)
        total_ce += float(ce)
    assert res["overall"]["answer_loss"] == pytest.approx(total_ce / 80, rel=1e-4)


def test_text_shards_per_window_loss_and_adaptive(tmp_path):
    from megasleep.data.shards import build_text_dataset
    from megasleep.data.tokenizer import train_tokenizer

    words = "the cat sat on a mat while two dogs ran past the old red barn and the sun was hot".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=int(rng.integers(10, 40)))) for _ in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    tok = train_tokenizer(tmp_path / "tok", texts=docs, vocab_size=60, byte_fallback=False, hard_vocab_limit=False,
                          max_chars=None, num_threads=1)
    build_text_dataset([str(tmp_path / "c.jsonl")], tmp_path / "text", tok.path, seq_len=48, progress=False)
    ck = save_pretrained(_model(tok.vocab_size, seed=1), tmp_path / "ck", tokenizer_path=tok.path)
    out = tmp_path / "res"
    assert _run("--checkpoint", ck, "--data", tmp_path / "text", "--eval-passes", "1,3", "--window", "16",
                "--max-examples", "6", "--batch-size", "4", "--adaptive-tol", "0.05", "--out", out) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["kind"] == "text" and (out / "loss_vs_window.png").is_file()
    assert not (out / "buckets.csv").exists()
    from megasleep.checkpoint.load import load_pretrained
    from megasleep.eval.data import batches, read_shards

    model = load_pretrained(ck)
    samples, _, _ = read_shards(tmp_path / "text", max_examples=6)
    for res in doc["results"]:
        assert [w["window"] for w in res["windows"]] == [0, 1, 2]
        # independent: full logits, CE per target token, token-weighted per window
        sums, counts = np.zeros(3), np.zeros(3)
        for _, b in batches(samples, 4):
            ids_t, mask_t = torch.from_numpy(b["input_ids"]), torch.from_numpy(b["loss_mask"])
            cfg = SleepConfig(window=16, passes=res["passes"], adaptive_tol=0.05)
            with torch.no_grad():
                lg = sleep_forward(model, ids_t, cfg, loss_mask=mask_t, doc_ids=torch.from_numpy(b["doc_ids"]),
                                   return_logits=True).logits
            ce = F.cross_entropy(lg[:, :-1].flatten(0, 1), ids_t[:, 1:].flatten(), reduction="none").view(len(ids_t), -1)
            tm = mask_t[:, 1:]
            for w in range(3):
                sl = slice(16 * w, 16 * (w + 1))  # CE at position t (target t+1) belongs to t's window
                sums[w] += float((ce[:, sl] * tm[:, sl]).sum())
                counts[w] += int(tm[:, sl].sum())
        for w, row in enumerate(res["windows"]):
            assert row["tokens"] == counts[w]
            assert row["loss"] == pytest.approx(sums[w] / counts[w], rel=1e-4)
            assert row["ppl"] == pytest.approx(math.exp(row["loss"]), rel=1e-9)
        ad = res["adaptive"]
        assert ad["tol"] == 0.05 and 1 <= ad["mean_passes_used"] <= res["passes"]
        assert sum(ad["histogram"].values()) == 3 * 2  # 3 windows x 2 batches
    rows = (out / "windows.csv").read_text().splitlines()
    assert rows[0] == "passes,window,tokens,loss,ppl,mean_passes_used" and len(rows) == 1 + 2 * 3


def test_gsm_generation_scoring(tmp_path):
    """GSM samples generated on the fly: the answer is generated greedily and scored with the
    GSM-Infinite extraction; the reported accuracy is the mean of the per-sample decisions."""
    from megasleep.data.tasks import get_task

    tok = get_task("gsm").make_task_tokenizer(tmp_path / "tok")
    ck = save_pretrained(_model(tok.vocab_size, seed=2), tmp_path / "ck", tokenizer_path=tok.path)
    out = tmp_path / "res"
    assert _run("--checkpoint", ck, "--task", "gsm", "--difficulty", "1,2", "--n-examples", "2", "--task-param",
                "length_min=60", "--task-param", "length_max=120", "--window", "32", "--eval-passes", "1,2",
                "--max-new-tokens", "3", "--out", out) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["source"] == "generator" and doc["data"]["params"]["length_min"] == 60
    recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and all("generated" in r and "extracted" in r for r in recs)
    from megasleep.eval.scoring import extract_integer_answer

    for res in doc["results"]:
        assert res["scoring"] == "generate" and res["gsm"]["ops"] == [1, 2]
        mine = [r for r in recs if r["passes"] == res["passes"]]
        for r in mine:
            assert r["extracted"] == extract_integer_answer("Answer: " + r["generated"].strip())
        assert res["overall"]["accuracy"] == pytest.approx(np.mean([r["correct"] for r in mine]))
        accs = [b["accuracy"] for b in res["buckets"]]
        assert res["gsm"]["auc"] == pytest.approx(100 * (accs[0] + accs[1]) / 2)


def test_generation_matches_teacher_forcing_on_a_known_predictor(r110):
    """greedy_generate (streaming engine) agrees with the constant model."""
    from megasleep.eval.harness import greedy_generate

    one = r110["tok"].piece_to_id("1")
    m = _constant_model(r110["tok"].vocab_size, one)
    out = greedy_generate(m, SleepConfig(window=4, passes=2), [[3, 4, 5], [4] * 9], [2, 5], batch_size=1)
    assert out == [[one] * 2, [one] * 5]


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_streamed_generation_equals_rerunning_the_chunked_forward(eviction):
    """The engine-based greedy generation gives the tokens that re-running the sleep forward gives."""
    from megasleep.eval.harness import CollectingRunner, greedy_generate, next_tokens
    from tests.conftest import tiny_model

    torch.manual_seed(3)
    model = tiny_model("AGMA", vocab=29)
    cfg = SleepConfig(window=5, passes=2, eviction=eviction)
    prefixes = [torch.randint(0, 29, (n,)).tolist() for n in (3, 11)]
    got = greedy_generate(model, cfg, prefixes, [6, 4])
    runner = CollectingRunner(model, cfg)
    for prefix, out, n in zip(prefixes, got, [6, 4]):
        ref: list[int] = []
        for _ in range(n):
            ref.append(next_tokens(runner, [prefix + ref])[0])
        assert out == ref


def test_bad_inputs(r110, depo, tmp_path, capsys):
    assert _run("--checkpoint", r110["ck"], "--task", "nosuch") == 2
    assert "unknown task 'nosuch'" in capsys.readouterr().err
    # depo shards were tokenized with another tokenizer than the rule110 checkpoint's
    assert _run("--checkpoint", r110["ck"], "--data", depo["shards"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert _run("--checkpoint", r110["ck"], "--data", tmp_path / "nothing") == 2
    assert "not found" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path)]) == 2
    assert _run("--checkpoint", r110["ck"], "--data", r110["shards"], "--scoring", "generate") == 2
    assert "applies to GSM" in capsys.readouterr().err
    # on-the-fly generation with the checkpoint's tokenizer works
    out = tmp_path / "gen"
    assert _run("--checkpoint", r110["ck"], "--task", "rule110", "--difficulty", "1,3", "--n-examples", "4",
                "--eval-passes", "1", "--out", out, "--no-plots") == 0
    doc = json.loads((out / "results.json").read_text())
    assert [b["n_samples"] for b in doc["results"][0]["buckets"]] == [4, 4]


@pytest.mark.parametrize("argv,new", [(["eval", "--checkpoint", "x", "--sleep-passes", "1,2"], "--eval-passes"),
                                      (["demo", "--passes", "1,2"], "--train-passes")])
def test_old_names_of_the_lists_of_n_are_refused_with_the_new_name(argv, new, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and f"{argv[-2]}: renamed {new}" in capsys.readouterr().err


def test_a_model_trained_with_a_sleep_remedy_is_evaluated_with_it(r110, tmp_path):
    """reinject / feedback_norm change the forward: the checkpoint's recorded switches reach the scorer
    (the same weights recorded without them score differently; before, both scored alike)."""
    model = _model(r110["tok"].vocab_size)
    loss = {}
    for name, switches in (("plain", {}), ("reinject", {"reinject": True, "feedback_norm": True})):
        ck = save_pretrained(model, tmp_path / name, tokenizer_path=r110["tok"].path,
                             sleep={"window": 8, "passes": 3, "eviction": "hard", **switches})
        out = tmp_path / f"res-{name}"
        assert _run("--checkpoint", ck, "--data", r110["shards"], "--eval-passes", "3", "--max-examples", "8", "--out", out,
                    "--no-plots", "--diagnostics-samples", "0") == 0
        doc = json.loads((out / "results.json").read_text())
        assert doc["settings"]["reinject"] == bool(switches) and doc["settings"]["window"] == 8
        loss[name] = doc["results"][0]["loss"]
    assert loss["plain"] != loss["reinject"]  # deterministic CPU runs: equal unless the forward differs
