"""``_common.chunk_decays`` (shared by the SSD and gated-delta chunk kernels): its segment sums are
differences of a split fp64 cumsum with a hand-written backward. Checked against the masked-cumsum
segment sum (``segsum``) computed in fp64: values, exact zeros across resets, gradients (gradcheck),
and fp32 accuracy when a chunk starts with a very strong decay (where a plain fp32 difference of
cumsums loses about ``|cum| * eps``)."""

import pytest
import torch

from megasleep.ops._common import chunk_decays, chunk_doc_index, segsum
from megasleep.ops.testing import random_reset


def _reference(la, doc):
    """fp64 masked-cumsum segment sums, exp, and the same document masks (plain autograd)."""
    L = torch.exp(segsum(la.double()))
    din = torch.exp(torch.cumsum(la.double(), -1))
    if doc is not None:
        L = L * (doc.unsqueeze(-1) == doc.unsqueeze(-2))
        din = din * (doc == 0)
    return L, din


def _doc(b, nc, q, seed):
    return chunk_doc_index(random_reset(b, nc * q, p=0.15, seed=seed), nc, q)[:, :, None]  # [b,c,1,Q]


@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_values_and_gradients_fp64(with_reset):
    b, nc, h, q = 2, 3, 2, 8
    la = -torch.rand(b, nc, h, q, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    doc = _doc(b, nc, q, seed=1) if with_reset else None
    L, din = chunk_decays(la, doc)
    L_ref, din_ref = _reference(la, doc)
    torch.testing.assert_close(L, L_ref, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(din, din_ref, atol=1e-14, rtol=1e-13)
    if with_reset:
        assert torch.equal(L == 0, L_ref == 0), "masked entries must be exact zeros"
    leaf = la.clone().requires_grad_()
    # atol: perturbing la_k moves cum_i - cum_j (k <= j) by rounding only, ~1e-16 / gradcheck's eps 1e-6
    assert torch.autograd.gradcheck(lambda x: chunk_decays(x, doc), (leaf,), atol=1e-8, rtol=1e-6)


def test_backward_matches_autograd_reference():
    la = -torch.rand(2, 4, 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    doc = _doc(2, 4, 16, seed=3)
    go = torch.randn(2, 4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = []
    for fn in (chunk_decays, _reference):
        leaf = la.clone().requires_grad_()
        (fn(leaf, doc)[0] * go).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-11)


@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_under_torch_compile_plain_ops_give_the_same_values_and_gradients(monkeypatch, with_reset, dtype, tol):
    """While dynamo traces (``torch.compiler.is_compiling()``) the segment sums are plain ops, not
    ``_SegmentDecay``: dynamo in torch 2.11 got that Function's gradient wrong (measured on 2.11.0;
    right in 2.13). The plain path must equal the Function, exact zeros included."""
    la = (-torch.rand(2, 3, 2, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3).to(dtype)
    doc = _doc(2, 3, 16, seed=6) if with_reset else None
    go = torch.randn(2, 3, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda c=compiling: c)
        leaf = la.clone().requires_grad_()
        L, _ = chunk_decays(leaf, doc)
        assert (type(L.grad_fn).__name__ == "_SegmentDecayBackward") != compiling
        (L * go).sum().backward()
        results.append((L.detach(), leaf.grad))
    (L0, g0), (L1, g1) = results
    assert torch.equal(L0 == 0, L1 == 0)
    torch.testing.assert_close(L1, L0, atol=tol, rtol=tol)
    torch.testing.assert_close(g1, g0, atol=tol, rtol=tol)


def test_fp32_accuracy_after_a_strong_decay():
    """A chunk whose first step decays by exp(-2000): later entries are O(1) decays taken as
    differences of cumsums near -2000. In fp32 they must still be as accurate as fp32 allows."""
    q = 64
    la = torch.full((1, q), -0.01, dtype=torch.float64)
    la[0, 0] = -2000.0
    L32, _ = chunk_decays(la.float())
    L64, _ = _reference(la, None)
    lower = torch.tril(torch.ones(q, q, dtype=torch.bool), -1)
    lower[0] = False
    rel = ((L32.double() - L64) / L64).abs()[0][lower]
    assert rel.max() < 1e-6, f"relative error {rel.max():.2e}"
