"""The whole sleeping model on CUDA: kernel backend vs the torch chunked backend (fp32 and bf16).

Runs only where CUDA and the kernel packages are present; elsewhere the module is skipped with the
reason. The op-level kernel parity tests are in test_ops_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)",
                allow_module_level=True)


def _kernels_or_skip():
    from megasleep.ops import _peers

    missing = [r for _, r in (_peers.mamba_chunk_scan_combined(), _peers.fla_chunk_gated_delta_rule()) if r]
    if missing:
        pytest.skip("; ".join(missing))


def run(model, ids, backend, passes, eviction, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = sleep_forward(model, ids, SleepConfig(window=24, passes=passes, eviction=eviction),
                            backend=backend, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float(), [c.ssm for c in out.caches if c.ssm is not None], grads


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("passes, eviction", [(1, "hard"), (3, "hard"), (2, "sliding")])
@pytest.mark.parametrize("pattern", ["AGMA", "MAGMA"])
def test_model_cuda_kernels_match_torch_path(pattern, passes, eviction, dtype, tol):
    _kernels_or_skip()
    torch.manual_seed(0)
    model = tiny_model(pattern, dtype=torch.float32, d=64, vocab=97,
                       n_prelude=1 if len(pattern) > 4 else 0, n_coda=0).cuda()
    ids = torch.randint(0, 97, (2, 100), device="cuda")
    a_logits, a_states, a_grads = run(model, ids, "cuda", passes, eviction, dtype)
    b_logits, b_states, b_grads = run(model, ids, "torch", passes, eviction, dtype)

    def rel(x, y):
        return float((x - y).norm() / y.norm().clamp_min(1e-12))

    assert rel(a_logits, b_logits) < tol
    for x, y in zip(a_states, b_states):
        assert rel(x.float(), y.float()) < tol
    assert a_grads.keys() == b_grads.keys()
    worst = max((rel(a_grads[n], b_grads[n]), n) for n in a_grads if b_grads[n].norm() > 0)
    assert worst[0] < 5 * tol, worst
