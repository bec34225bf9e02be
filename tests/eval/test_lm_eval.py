"""lm-evaluation-harness through its command line (wrapped so that `--model megasleep` is registered):
three local YAML tasks (multiple_choice -> loglikelihood, loglikelihood_rolling, generate_until), no
downloads. The rolling log-likelihood is checked against a direct computation with the model."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.train.helpers import pythonpath

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "two plus two is four", "the sun is hot today"]


def _task(name: str, body: str, data: Path) -> str:
    return (f"task: megasleep_tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megasleep.checkpoint.released import save_pretrained
    from megasleep.data.tokenizer import train_tokenizer
    from megasleep.models import HybridLM
    from tests.conftest import tiny_config

    d = tmp_path_factory.mktemp("lmeval")
    tok = train_tokenizer(d / "tok", texts=TEXTS * 20, vocab_size=60, byte_fallback=False, hard_vocab_limit=False,
                          max_chars=None, num_threads=1)
    torch.manual_seed(0)
    ck = save_pretrained(HybridLM(tiny_config("AGMA", vocab=tok.vocab_size)), d / "ck", tokenizer_path=tok.path)
    tasks = d / "tasks"
    tasks.mkdir()
    rows = {
        "mc": [{"question": "the cat sat on the", "choices": ["mat", "sun"], "label": 0},
               {"question": "two plus two is", "choices": ["four", "dog"], "label": 0},
               {"question": "a dog ran in the", "choices": ["cat", "park"], "label": 1}],
        "ppl": [{"text": t} for t in TEXTS[:3]],
        "gen": [{"question": "the cat sat on the", "answer": "mat"}, {"question": "two plus", "answer": "two"}],
    }
    for name, rs in rows.items():
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    bodies = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
              "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n",
        "ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
               "  - metric: word_perplexity\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
               "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 3\n  do_sample: false\nmetric_list:\n"
               "  - metric: exact_match\n",
    }
    for name, body in bodies.items():
        (tasks / f"tiny_{name}.yaml").write_text(_task(name, body, tasks / f"{name}.jsonl"))
    return dict(dir=d, tok=tok, ck=ck, tasks=tasks)


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_lm_eval_cli_with_megasleep_model(setup):
    d = setup["dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(d / "hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "megasleep.eval.lm_eval_cli", "--model", "megasleep", "--model_args",
           f"pretrained={setup['ck']},passes=2,window=4,eviction=hard",
           "--tasks", "megasleep_tiny_mc,megasleep_tiny_ppl,megasleep_tiny_gen", "--include_path", str(setup["tasks"]),
           "--output_path", str(d / "out"), "--log_samples"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=d)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    files = sorted((d / "out").rglob("results_*.json"))
    assert files, list((d / "out").rglob("*"))
    res = json.loads(files[-1].read_text())
    out = res["results"]
    acc = out["megasleep_tiny_mc"]["acc,none"]
    em = out["megasleep_tiny_gen"]["exact_match,none"]
    wppl = out["megasleep_tiny_ppl"]["word_perplexity,none"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= em <= 1.0 and wppl > 1.0
    assert res["config"]["model"] == "megasleep"
    if not torch.cuda.is_available():  # the record names the device really used
        assert res["config"]["device"] == "cpu"
    gen = [json.loads(x) for f in (d / "out").rglob("samples_megasleep_tiny_gen_*.jsonl") for x in f.read_text().splitlines()]
    assert len(gen) == 2 and all(isinstance(g["resps"][0][0], str) for g in gen)

    # rolling log-likelihood, computed directly: [BOS] + tokens through the same sleep forward
    from megasleep.checkpoint.load import load_pretrained
    from megasleep.sleep import SleepConfig, sleep_forward

    model, tok = load_pretrained(setup["ck"]), setup["tok"]
    total_ll, words = 0.0, 0
    for t in TEXTS[:3]:
        ids = torch.tensor([[tok.bos_id, *tok.encode(t)]])
        with torch.no_grad():
            lg = sleep_forward(model, ids, SleepConfig(window=4, passes=2), return_logits=True).logits
        total_ll -= float(F.cross_entropy(lg[0, :-1], ids[0, 1:], reduction="sum"))
        words += len(re.split(r"\s+", t))
    assert wppl == pytest.approx(math.exp(-total_ll / words), rel=1e-4)


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_unknown_model_args_are_one_line_errors(setup):
    """A typo (passe for passes) must not run at another N: exit code 2, the key named."""
    d = setup["dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(d / "hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "megasleep.eval.lm_eval_cli", "--model", "megasleep", "--model_args",
           f"pretrained={setup['ck']},passe=4", "--tasks", "megasleep_tiny_mc", "--include_path",
           str(setup["tasks"])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=d)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "unknown model_args 'passe' (did you mean 'passes'?)" in last
    assert "Traceback" not in r.stderr


def test_device_defaults_to_cpu_without_cuda():
    from megasleep.eval.lm_eval_adapter import unknown_args_message
    from megasleep.eval.lm_eval_cli import _with_device

    run = ["--model", "megasleep", "--tasks", "x"]
    assert _with_device(run, cuda=False) == [*run, "--device", "cpu"]
    assert _with_device(["run", *run], cuda=False)[-2:] == ["--device", "cpu"]
    assert _with_device(run, cuda=True) == run  # lm_eval's own default (cuda:0) is then true
    assert _with_device([*run, "--device", "cuda:1"], cuda=False)[-1] == "cuda:1"  # the adapter refuses it
    assert _with_device(["ls", "tasks"], cuda=False) == ["ls", "tasks"]
    assert "did you mean 'window'" in unknown_args_message(["windw"])
    assert "'sleep_passes' (renamed 'passes')" in unknown_args_message(["sleep_passes"])  # the old key


def test_cuda_device_without_cuda_is_an_error(setup):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is valid here")
    from megasleep.eval.lm_eval_adapter import MegasleepLM

    with pytest.raises(ValueError, match="CUDA is not available"):
        MegasleepLM(pretrained=str(setup["ck"]), device="cuda:0")
