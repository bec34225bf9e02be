"""No host sync inside the window and pass loops on CUDA: ``torch.cuda.set_sync_debug_mode("error")``
while ``SleepRunner.run_windows`` runs a training forward and while its backward runs."""

from __future__ import annotations

import pytest
import torch

from megasleep.sleep import SleepConfig, SleepRunner, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)",
                allow_module_level=True)


@pytest.fixture
def sync_errors(monkeypatch):
    real = SleepRunner.run_windows

    def guarded(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(SleepRunner, "run_windows", guarded)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_training_step_without_host_sync_cuda(sync_errors, backend, eviction):
    model = tiny_model("MAGA", dtype=torch.float32, n_prelude=1, n_coda=1, d=64, vocab=97).cuda()
    ids = torch.randint(0, 97, (2, 96), device="cuda")
    torch.cuda.synchronize()
    cfg = SleepConfig(window=32, passes=3, eviction=eviction)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sleep_forward(model, ids, cfg, backend=backend)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss.detach()).item()
