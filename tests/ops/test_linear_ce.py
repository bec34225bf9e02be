"""The chunked LM-head cross-entropy against the full-logits reference: loss and the gradients of h
and of the weight, in both modes, on fresh random inputs (fp64 tight, fp32, bf16 autocast, bf16 weights)."""

from __future__ import annotations

import pytest
import torch

from megasleep.ops.linear_ce import linear_cross_entropy_chunk, linear_cross_entropy_naive


def inputs(n_b=3, n_t=37, d=24, vocab=101, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_b, n_t, d, generator=g, dtype=dtype)
    w = torch.randn(vocab, d, generator=g, dtype=dtype) / d**0.5
    tgt = torch.randint(0, vocab, (n_b, n_t), generator=g)
    mask = torch.rand(n_b, n_t, generator=g) > 0.3
    return h, w, tgt, mask


def loss_and_grads(fn, h, w, tgt, mask, scale=1.0, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, tgt, mask, **kw)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("chunk_elements", [101 * 33, 101 * 40, 1 << 24, 50])  # 33 rows, 40, all, the minimum (32)
def test_chunk_equals_reference_fp64(grad_in_forward, chunk_elements):
    h, w, tgt, mask = inputs(n_t=57, seed=chunk_elements)  # 171 rows: chunks do not divide
    ref = loss_and_grads(linear_cross_entropy_naive, h, w, tgt, mask, scale=0.37)
    got = loss_and_grads(linear_cross_entropy_chunk, h, w, tgt, mask, scale=0.37, grad_in_forward=grad_in_forward,
                         chunk_elements=chunk_elements)
    for a, b, what in zip(got, ref, ("loss", "dh", "dW")):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=what)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_fp32_and_a_tied_weight_used_twice(grad_in_forward):
    """The weight also feeds an embedding lookup (tied embeddings): both gradients add up."""
    h, w, tgt, mask = inputs(dtype=torch.float32, seed=5)
    ids = torch.randint(0, w.shape[0], (3, 37))

    def run(fn, **kw):
        ww = w.clone().requires_grad_()
        hh = h + torch.nn.functional.embedding(ids, ww)
        loss = fn(hh, ww, tgt, mask, **kw)
        loss.backward()
        return loss.detach(), ww.grad

    (l_ref, g_ref), (l_got, g_got) = run(linear_cross_entropy_naive), run(
        linear_cross_entropy_chunk, grad_in_forward=grad_in_forward, chunk_elements=101 * 40)
    torch.testing.assert_close(l_got, l_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)


def assert_as_accurate(got, ref, truth, what):
    """16-bit results: ``got`` is at least as close to the fp64 truth as the reference path is."""
    err_got = (got.double() - truth).abs().max().item()
    err_ref = (ref.double() - truth).abs().max().item()
    assert err_got <= 1.25 * err_ref + 1e-6, f"{what}: error {err_got:.3g} vs reference's {err_ref:.3g}"


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_bf16_autocast_is_as_accurate_as_the_autocast_reference(grad_in_forward):
    h, w, tgt, mask = inputs(dtype=torch.float32, seed=7, d=64, vocab=257)
    truth = loss_and_grads(linear_cross_entropy_naive, h.double(), w.double(), tgt, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = loss_and_grads(linear_cross_entropy_naive, h, w, tgt, mask)
        got = loss_and_grads(linear_cross_entropy_chunk, h, w, tgt, mask, grad_in_forward=grad_in_forward,
                             chunk_elements=257 * 20)
    assert got[1].dtype == got[2].dtype == torch.float32  # gradients in the parameters' dtype
    for a, b, t, what in zip(got, ref, truth, ("loss", "dh", "dW")):
        assert_as_accurate(a, b, t, what)


def test_bf16_weights_give_bf16_gradients():
    h, w, tgt, mask = inputs(dtype=torch.float32, seed=9, d=64, vocab=257)
    hb, wb = h.bfloat16(), w.bfloat16()
    truth = loss_and_grads(linear_cross_entropy_naive, hb.double(), wb.double(), tgt, mask)
    ref = loss_and_grads(linear_cross_entropy_naive, hb, wb, tgt, mask)
    got = loss_and_grads(linear_cross_entropy_chunk, hb, wb, tgt, mask, grad_in_forward=True)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    for a, b, t, what in zip(got, ref, truth, ("loss", "dh", "dW")):
        assert_as_accurate(a, b, t, what)


def test_gradcheck_and_no_grad():
    h, w, tgt, mask = inputs(n_b=2, n_t=40, d=6, vocab=11, seed=3)  # 80 rows: 3 chunks of 32
    for gif in (False, True):
        torch.autograd.gradcheck(lambda a, b, gif=gif: linear_cross_entropy_chunk(
            a, b, tgt, mask, grad_in_forward=gif, chunk_elements=1), (h.requires_grad_(), w.requires_grad_()))
    with torch.no_grad():
        got = linear_cross_entropy_chunk(h, w, tgt, mask, grad_in_forward=True)
    assert got.grad_fn is None
    torch.testing.assert_close(got, linear_cross_entropy_naive(h, w, tgt, mask).detach())


def test_bad_shapes_are_named():
    h, w, tgt, mask = inputs()
    with pytest.raises(ValueError, match=r"weight must be \[V, d\] with d = h.shape\[-1\] = 24"):
        linear_cross_entropy_chunk(h, w[:, :5], tgt, mask)
    with pytest.raises(ValueError, match="targets and mask must have shape"):
        linear_cross_entropy_chunk(h, w, tgt[:, :3], mask)
    with pytest.raises(ValueError, match="chunk_elements"):
        linear_cross_entropy_chunk(h, w, tgt, mask, chunk_elements=0)


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_backward_twice_over_one_forward(grad_in_forward):
    """retain_graph (gradcheck, ``autograd.grad`` twice): the gradients kept from the forward must not be
    scaled in place by the first backward."""
    h, w, tgt, mask = inputs(dtype=torch.float32, seed=7)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy_chunk(h, w, tgt, mask, grad_in_forward=grad_in_forward, chunk_elements=101 * 40)
    first = torch.autograd.grad(loss * 0.5, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss * 0.5, (h, w))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
