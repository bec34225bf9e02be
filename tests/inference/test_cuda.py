"""On CUDA: the engine's wake steps go through the kernels' step functions (mamba_ssm's
selective_state_update, FLA's fused recurrent gated delta rule, causal_conv1d_update — each where it
imports) and its logits still match the chunked sleep forward (which uses the chunk kernels).

With ``TRITON_INTERPRET=1`` it runs on CPU with the Triton kernels under Triton's interpreter (one
case, shorter; no compiled conv kernels there): ``tests/ops/test_triton_interpreter.py`` runs it so."""

from __future__ import annotations

import pytest
import torch

from megasleep.inference import Session
from megasleep.ops import _peers
from megasleep.ops.testing import count_calls, kernel_test_device
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_config

pytestmark = pytest.mark.gpu
DEV = kernel_test_device()
INTERPRETED = DEV == "cpu"
# under the interpreter (seconds per kernel call): one case with a prelude and a coda, two sleeps
SPECS = [("MAGMA", 1, 1)] if INTERPRETED else [("MAGMA", 1, 1), ("GAMG", 0, 0)]
EVICTIONS = ["sliding"] if INTERPRETED else ["hard", "sliding"]
L, N, T, PROMPT = (16, 2, 40, 12) if INTERPRETED else (16, 3, 61, 21)

STEP_KERNELS = {  # dispatcher module, cuda wrapper name, _peers getter
    "ssd_step": ("megasleep.ops.ssd.cuda", "ssd_step_cuda", _peers.selective_state_update),
    "gdn_step": ("megasleep.ops.gated_delta.cuda", "gdn_step_cuda", _peers.fla_fused_recurrent_gated_delta_rule),
    "conv_step": ("megasleep.ops.conv.cuda", "causal_conv1d_step_cuda", _peers.causal_conv1d_update),
}


def cuda_model(pattern, n_prelude, n_coda, seed=0):
    from megasleep.models import HybridLM

    torch.manual_seed(seed)
    cfg = tiny_config(pattern, n_prelude=n_prelude, n_coda=n_coda, d=64, kernels="auto",
                      # 4 Mamba-2 heads under the interpreter, whose time grows with the program count
                      mamba2=dict(d_state=16, headdim=32 if INTERPRETED else 16, expand=2, chunk_size=16),
                      gdn=dict(n_heads=2, head_dim=32, chunk_size=16))
    return HybridLM(cfg).to(DEV).eval()


@pytest.mark.parametrize("eviction", EVICTIONS)
@pytest.mark.parametrize("spec", SPECS)
def test_cuda_engine_matches_chunked_forward_and_uses_step_kernels(monkeypatch, spec, eviction):
    calls = count_calls(monkeypatch, {name: (mod, attr) for name, (mod, attr, getter) in STEP_KERNELS.items()
                                      if getter()[0] is not None})
    model = cuda_model(*spec)
    ids = torch.randint(0, model.config.vocab_size, (2, T), device=DEV)
    cfg = SleepConfig(window=L, passes=N, eviction=eviction)
    with torch.no_grad():
        ref = sleep_forward(model, ids, cfg, return_logits=True).logits
        sess = Session(model, cfg, batch=2)
        out = [sess.feed(ids[:, :PROMPT])]
        for t in range(PROMPT, T):
            out.append(sess.step(ids[:, t])[:, None])
    got = torch.cat(out, 1)
    torch.testing.assert_close(got, ref, rtol=2e-3, atol=2e-3)
    print("step kernels used:", calls, "kernels:", _peers.kernel_report())
    has = {"M": "ssd_step", "G": "gdn_step"}
    for letter, name in has.items():
        if letter in spec[0] and STEP_KERNELS[name][2]()[0] is not None:
            assert calls.get(name, 0) >= T - PROMPT, (name, calls)
