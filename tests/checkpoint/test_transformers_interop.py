"""transformers interop: after ``import megasleep``, AutoConfig / AutoModelForCausalLM load a megasleep
export (also when written sharded) and give HybridLM's logits under the recorded sleep settings;
``generate`` runs the streaming engine."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megasleep.checkpoint.released import save_pretrained
from megasleep.inference.generate import generate
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytest.importorskip("transformers")


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_automodel_logits_equal_hybridlm(tmp_path, shard):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = tiny_model("AGMA", dtype=torch.float32).eval()
    sleep = SleepConfig(window=8, passes=2)
    kw = {"max_shard_size": shard} if shard else {}
    out = save_pretrained(model, tmp_path / "m", sleep=sleep, **kw)
    if shard:
        assert (out / "model.safetensors.index.json").is_file()
    assert AutoConfig.from_pretrained(out).model_type == "megasleep"
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "MegasleepForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = sleep_forward(model, ids, sleep, return_logits=True).logits
        got = hf(ids).logits
    assert torch.equal(got, want)  # same weights, same code path: bit-identical
    with torch.no_grad():
        assert torch.allclose(hf(ids, passes=1).logits, sleep_forward(model, ids, SleepConfig(window=8, passes=1),
                                                                      return_logits=True).logits)


def test_generate_runs_the_streaming_engine(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("AGMA", dtype=torch.float32).eval()
    sleep = SleepConfig(window=6, passes=2)
    out = save_pretrained(model, tmp_path / "m", sleep=sleep)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    seq = hf.generate(prompt, max_new_tokens=9)
    want = generate(model, prompt.tolist(), 9, sleep=sleep, temperature=0.0).tokens[0]
    assert seq.shape == (1, 14) and seq[0, 5:].tolist() == want


def test_registration_needs_only_import_megasleep(tmp_path):
    """A fresh interpreter: import megasleep first, transformers afterwards (the hook path)."""
    model = tiny_model("AG", dtype=torch.float32)
    out = save_pretrained(model, tmp_path / "m")
    code = ("import megasleep, sys; assert 'transformers' not in sys.modules; "
            "from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); print(type(m).__name__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "MegasleepForCausalLM" in r.stdout, r.stderr[-2000:]
