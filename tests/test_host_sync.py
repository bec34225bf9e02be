"""No host sync inside the window and pass loops: while ``SleepRunner.run_windows`` runs, turning a
tensor into a Python value (``item``, ``tolist``, ``bool``/``int``/``float``, ``numpy``) raises.
On a GPU such a conversion stalls the CPU until the device catches up, once per window and pass;
the CUDA twin of this test (tests/gpu/test_host_sync_cuda.py) uses torch's sync debug mode."""

from __future__ import annotations

import contextlib

import pytest
import torch

from megasleep.sleep import SleepConfig, SleepRunner, sleep_forward
from tests.conftest import tiny_model

CONVERSIONS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def forbid_host_sync():
    saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def refuse(name):
        def fn(self, *a, **k):
            raise HostSync(f"Tensor.{name}() inside the window/pass loop (a host sync on GPU)")
        return fn

    try:
        for name in CONVERSIONS:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.fixture
def guarded_loop(monkeypatch):
    real = SleepRunner.run_windows

    def guarded(self, *args, **kwargs):
        with forbid_host_sync():
            return real(self, *args, **kwargs)

    monkeypatch.setattr(SleepRunner, "run_windows", guarded)


def test_guard_catches_a_conversion(guarded_loop, monkeypatch):
    """The guard is live: a loop step that reads a loss as a float is caught."""
    real = SleepRunner.evict

    def evict_and_log(self, caches):
        float(caches[1].ssm.sum())
        return real(self, caches)

    monkeypatch.setattr(SleepRunner, "evict", evict_and_log)
    model = tiny_model("AGMA")
    with pytest.raises(HostSync, match="__float__"):
        sleep_forward(model, torch.randint(0, 61, (2, 20)), SleepConfig(window=8, passes=2))


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_training_step_has_no_host_sync_in_the_loop(guarded_loop, eviction, checkpoint):
    model = tiny_model("MAGA", n_prelude=1, n_coda=1)
    ids = torch.randint(0, 61, (2, 30))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, :12] = False  # the first window has no targets: its head is skipped without a sync
    docs = torch.zeros_like(ids)
    docs[:, 17:] = 1
    cfg = SleepConfig(window=8, passes=3, eviction=eviction, checkpoint=checkpoint, truncate_backprop=1)
    out = sleep_forward(model, ids, cfg, loss_mask=mask, doc_ids=docs)
    with forbid_host_sync():  # the backward, with its recomputation of checkpointed regions, too
        out.loss.backward()
    # counted on the host outside the loop: targets are positions t with loss_mask[t + 1]
    assert out.window_tokens == [0, 10, 16, 10] and out.n_tokens == 36
    assert out.window_loss[0] != out.window_loss[0]  # nan: no targets
    assert all(loss > 0 for loss in out.window_loss[1:]) and torch.isfinite(out.loss.detach())
