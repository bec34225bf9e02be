"""The whole sleeping model on CUDA: kernel backend vs the torch chunked backend (fp32 and bf16).

Runs only where CUDA and the kernel packages are present; elsewhere the module is skipped with the
reason. The op-level kernel parity tests are in test_ops_cuda.py. With ``TRITON_INTERPRET=1`` the
model runs on CPU with mamba_ssm's and fla's Triton kernels under Triton's interpreter (fp32, a
shorter sequence; the compiled conv kernels are absent there, so ``"auto"`` is compared instead of
``"cuda"``); ``tests/ops/test_triton_interpreter.py`` runs this file that way.
"""

from __future__ import annotations

import pytest
import torch

from megasleep.ops.testing import count_calls, kernel_test_device
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.gpu

DEV = kernel_test_device()
INTERPRETED = DEV == "cpu"
# Under the interpreter (every kernel call takes seconds there): fp32 only (bf16 is checked kernel by
# kernel in test_ops_cuda.py), two windows, and the one case that has everything: a prelude, feature
# feedback over 2 passes, the SSM states carried across windows, sliding eviction.
KERNELS = "auto" if INTERPRETED else "cuda"
DTYPES = [(torch.float32, 2e-3)] + ([] if INTERPRETED else [(torch.bfloat16, 6e-2)])
TOKENS = 48 if INTERPRETED else 100
# Mamba-2 with 4 heads of 32 instead of 16 of 8: the interpreter's time grows with the program count
MODEL_KW = dict(mamba2=dict(d_state=8, headdim=32, expand=2, chunk_size=8)) if INTERPRETED else {}
CASES = [("MAGMA", 2, "sliding")] if INTERPRETED else [
    (pattern, passes, eviction)
    for pattern in ("AGMA", "MAGMA")
    for passes, eviction in ((1, "hard"), (3, "hard"), (2, "sliding"))
]


def _kernels_or_skip():
    from megasleep.ops import _peers

    missing = [r for _, r in (_peers.mamba_chunk_scan_combined(), _peers.fla_chunk_gated_delta_rule()) if r]
    if missing:
        pytest.skip("; ".join(missing))


# every SSM scan implementation the dispatchers can choose: the kernels, and the torch path
SCANS = {
    "ssd_cuda": ("megasleep.ops.ssd.cuda", "ssd_cuda"),
    "gdn_cuda": ("megasleep.ops.gated_delta.cuda", "gdn_cuda"),
    "ssd_chunk": ("megasleep.ops.ssd", "ssd_chunk"),
    "gdn_chunk": ("megasleep.ops.gated_delta", "gdn_chunk"),
}


def run(model, ids, backend, passes, eviction, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = sleep_forward(model, ids, SleepConfig(window=24, passes=passes, eviction=eviction),
                            backend=backend, return_logits=True)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), [c.ssm.detach() for c in out.caches if c.ssm is not None], grads


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("pattern, passes, eviction", CASES)
def test_model_cuda_kernels_match_torch_path(pattern, passes, eviction, dtype, tol, monkeypatch):
    _kernels_or_skip()
    calls = count_calls(monkeypatch, SCANS)
    torch.manual_seed(0)
    model = tiny_model(pattern, dtype=torch.float32, d=64, vocab=97,
                       n_prelude=1 if len(pattern) > 4 else 0, n_coda=0, **MODEL_KW).to(DEV)
    ids = torch.randint(0, 97, (2, TOKENS), device=DEV)
    a_logits, a_states, a_grads = run(model, ids, KERNELS, passes, eviction, dtype)
    # every SSM scan went through the kernels (no silent fallback to the torch path)
    assert calls.keys() == {"ssd_cuda", "gdn_cuda"}, calls
    b_logits, b_states, b_grads = run(model, ids, "torch", passes, eviction, dtype)

    def rel(x, y):
        return float((x - y).norm() / y.norm().clamp_min(1e-12))

    assert rel(a_logits, b_logits) < tol
    for x, y in zip(a_states, b_states):
        assert rel(x.float(), y.float()) < tol
    assert a_grads.keys() == b_grads.keys()
    worst = max((rel(a_grads[n], b_grads[n]), n) for n in a_grads if b_grads[n].norm() > 0)
    assert worst[0] < 5 * tol, worst
