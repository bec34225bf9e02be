"""Trainer.train_step reads nothing back to the host per micro-batch: the number of tensor -> Python
conversions of a step does not grow with the number of micro-batches (the engine is faked, so only the
step's own code is counted, not the model's)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from megasleep.sleep import SleepOutput
from megasleep.train.config import load_experiment
from megasleep.train.trainer import Trainer


class FakeEngine:
    def __init__(self):
        self.backwards = []

    def __call__(self, ids, mask, docs, sleep_cfg, step):
        B, T = ids.shape
        n_win = -(-T // sleep_cfg.window)
        tgt = mask[:, 1:].sum()
        loss_sum = (ids.float().mean() * tgt).requires_grad_()
        return SleepOutput(loss=loss_sum / tgt, loss_sum=loss_sum, n_tokens=B * (T - 1),
                           window_loss_sum=torch.full((n_win,), 0.5 * B), window_tokens=[B] * n_win, passes=1,
                           passes_used=[1] * n_win)

    def backward(self, loss):
        self.backwards.append(loss)

    def step(self):
        pass

    def was_step_applied(self):
        return True

    def get_global_grad_norm(self):
        return torch.tensor(1.5)


def fake_trainer(accum: int) -> Trainer:
    t = object.__new__(Trainer)  # the step's collaborators only: no process group, no model
    t.cfg = load_experiment(None, ["train.global_batch_size=8", f"train.micro_batch_size={8 // accum}"])
    t.device, t.world, t.accum, t.step, t.zero_stage = torch.device("cpu"), 1, accum, 0, 1
    ids = (torch.arange(8 * 30).reshape(8, 30) % 7).chunk(accum)  # one global batch, split in micro-batches
    micro = [{"input_ids": x, "loss_mask": torch.ones_like(x, dtype=torch.bool), "doc_ids": torch.zeros_like(x)}
             for x in ids]
    t.train_data = SimpleNamespace(batches=lambda step: micro)
    t.engine = FakeEngine()
    t.module = SimpleNamespace(time_sleep=False)
    t.optimizer = SimpleNamespace(param_groups=[{"lr": 1e-3}])
    t.flops = SimpleNamespace(forward_flops=lambda *a: 1.0)
    t.stop = SimpleNamespace(wants_stop=lambda: False, budget_spent=lambda: False)
    return t


def count_conversions(monkeypatch, fn) -> int:
    calls = []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    fn()
    monkeypatch.undo()
    return len(calls)


@pytest.mark.parametrize("accum", [2, 8])
def test_host_reads_per_step_do_not_grow_with_micro_batches(monkeypatch, accum):
    one = fake_trainer(1)
    many = fake_trainer(accum)
    rec_one = {}
    rec_many = {}
    n_one = count_conversions(monkeypatch, lambda: rec_one.update(one.train_step()))
    n_many = count_conversions(monkeypatch, lambda: rec_many.update(many.train_step()))
    assert len(many.engine.backwards) == accum
    assert n_many == n_one, (n_one, n_many)
    # the same global batch: the same loss, tokens and per-window sums, whatever the split
    assert rec_many["loss"] == pytest.approx(rec_one["loss"]) and rec_many["target_tokens"] == rec_one["target_tokens"]
    assert rec_many["windows"] == rec_one["windows"] and rec_one["grad_norm"] == 1.5  # exact: sums of halves
