"""Selective activation checkpointing: none / every k-th core block / per (window, pass) give the
same loss and gradients, and store less the more they recompute."""

from __future__ import annotations

import pytest
import torch

import megasleep.sleep.loop as loop
from megasleep.plan import _saved_bytes
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

POLICIES = {"none": dict(checkpoint=False), "pass": dict(checkpoint=True, checkpoint_blocks=None),
            "blocks:1": dict(checkpoint=True, checkpoint_blocks=1),
            "blocks:2": dict(checkpoint=True, checkpoint_blocks=2)}


def step(policy, dtype=torch.float64):
    model = tiny_model("GAMAGM", n_prelude=1, n_coda=1, dtype=dtype)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(3))
    box = {}
    saved = _saved_bytes(lambda: box.setdefault("out", sleep_forward(
        model, ids, SleepConfig(window=8, passes=2, **POLICIES[policy]))))
    out = box["out"]
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads, saved


def test_policies_agree_and_trade_memory():
    ref_loss, ref_grads, _ = step("none")
    saved = {}
    for policy in POLICIES:
        loss, grads, saved[policy] = step(policy)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12, msg=f"{policy}: {n}")
    # tensors kept for backward outside checkpointed regions (checkpoint keeps only region inputs;
    # 'pass' keeps the last window's whole pass, which backward frees before it recomputes any other)
    assert saved["none"] > saved["blocks:2"] > saved["blocks:1"]
    assert saved["none"] > saved["pass"]


@pytest.mark.parametrize("k, expected", [(1, 4 + 4 + 1), (2, 2 + 2 + 1), (3, 2 + 2 + 1), (None, 1 + 1)])
def test_every_kth_block_is_checkpointed(monkeypatch, k, expected):
    calls = []
    real = loop.checkpoint
    monkeypatch.setattr(loop, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    model = tiny_model("GAMAGM", n_prelude=1, n_coda=1)  # 4 core blocks
    ids = torch.randint(0, 61, (2, 16))
    sleep_forward(model, ids, SleepConfig(window=8, checkpoint_blocks=k))  # two windows, one pass
    # every k-th core block of both windows + the first window's coda; per (window, pass): the first
    # window's pass + its coda. The last window's coda (and its whole pass) is not recomputed: backward
    # starts with it, recomputing it would rebuild at once what it freed
    assert len(calls) == expected


@pytest.mark.parametrize("policy", ["pass", "blocks:1"])
def test_the_steps_last_region_runs_once(monkeypatch, policy):
    """Per (window, pass): every block of the last window runs its forward once per step (no
    recompute in backward), the earlier window's core and coda blocks twice. Every block: the core
    blocks are recomputed in both windows (keeping a whole pass would cost more than one block's
    recompute), the last window's coda is not."""
    model = tiny_model("GAMAGM", n_prelude=1, n_coda=1)
    runs = [0] * len(model.layers)
    for i, blk in enumerate(model.layers):
        # a pre-hook: torch's recompute stops early once it has what backward needs (a post-hook may not fire)
        blk.register_forward_pre_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    ids = torch.randint(0, 61, (2, 16))
    cfg = SleepConfig(window=8, **POLICIES[policy])
    core, coda = set(model.core_idx), set(model.coda_idx)
    twice_in_last = core if policy == "blocks:1" else set()
    sleep_forward(model, ids, cfg).loss.backward()
    assert runs == [2 + (i in core | coda) + (i in twice_in_last) for i in range(len(model.layers))], runs
    runs[:] = [0] * len(runs)
    sleep_forward(model, ids[:, :8], cfg).loss.backward()  # one window
    assert runs == [1 + (i in twice_in_last) for i in range(len(model.layers))], runs


def test_checkpoint_blocks_validated():
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        SleepConfig(window=8, checkpoint_blocks=0)
