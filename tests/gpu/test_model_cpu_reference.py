"""The whole sleeping model on CUDA (kernels "auto", fast attention paths, bf16 autocast and bf16
parameters) against the fp32 CPU torch path of the same weights: logits, loss and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from megasleep.models.precision import cast_parameters
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)",
                allow_module_level=True)


def run(model, ids, cfg, backend, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = sleep_forward(model, ids, cfg, backend=backend, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float().cpu(), out.loss.float().cpu(), grads


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("mode", ["autocast", "bf16-params"])
@pytest.mark.parametrize("passes, eviction", [(1, "hard"), (2, "hard"), (2, "sliding")])
def test_cuda_model_matches_cpu_reference(mode, passes, eviction):
    torch.manual_seed(0)
    ref = tiny_model("MAGA", dtype=torch.float32, d=128, vocab=97, n_prelude=1, n_coda=0)
    gpu = copy.deepcopy(ref).cuda()
    if mode == "bf16-params":
        cast_parameters(gpu)
    ids = torch.randint(0, 97, (2, 320))
    cfg = SleepConfig(window=128, passes=passes, eviction=eviction)
    r_logits, r_loss, r_grads = run(ref, ids, cfg, "torch", autocast=False)
    g_logits, g_loss, g_grads = run(gpu, ids.cuda(), cfg, "auto", autocast=mode == "autocast")
    assert abs(g_loss.item() - r_loss.item()) < 2e-2 * abs(r_loss.item())
    assert rel_err(g_logits, r_logits) < 3e-2
    for n in r_grads:  # bf16: relative to each gradient's norm
        assert rel_err(g_grads[n], r_grads[n]) < 8e-2, n
