"""``ssd.chunk.ChunkRecurrence`` (the inter-chunk state recurrence, hand-written backward) against
the plain autograd loop it replaces: gradcheck in fp64, and gradients when only one output is used."""

import pytest
import torch

from megasleep.ops.ssd.chunk import ChunkRecurrence


def _loop(states, decay_chunk, S0):
    S, s_in = S0, []
    for c in range(states.shape[1]):
        s_in.append(S)
        S = decay_chunk[:, c, ..., None, None] * S + states[:, c]
    return torch.stack(s_in, dim=1), S


def _inputs(nc, seed):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(2, nc, 1, 3, 4, 5, generator=gen, dtype=torch.float64)
    dc = torch.rand(2, nc, 1, 3, generator=gen, dtype=torch.float64)
    dc[0, nc // 2] = 0.0  # a reset inside a chunk zeroes its decay
    S0 = torch.randn(2, 1, 3, 4, 5, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (states, dc, S0)]


@pytest.mark.parametrize("nc", [1, 2, 5])
def test_gradcheck(nc):
    assert torch.autograd.gradcheck(ChunkRecurrence.apply, _inputs(nc, seed=nc), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("use", ["s_in", "final", "both"])
def test_matches_autograd_loop(use):
    grads = []
    for fn in (_loop, ChunkRecurrence.apply):
        leaves = _inputs(4, seed=7)
        s_in, S = fn(*leaves)
        loss = {"s_in": s_in.square().sum(), "final": S.square().sum(), "both": s_in.sum() + S.square().sum()}[use]
        loss.backward()
        grads.append([s_in.detach(), S.detach()] + [t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)
