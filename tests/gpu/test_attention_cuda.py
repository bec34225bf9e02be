"""Attention kernels on CUDA: plain causal SDPA (flash / efficient / cuDNN) and compiled FlexAttention
with its block mask, against the explicit-mask reference, forward and backward, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from megasleep.models.attn_kernels import attend, flex_masked, masked_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available on this machine (torch.cuda.is_available() is False)",
                allow_module_level=True)


def fwd_bwd(fn, tensors):
    out = fn(*tensors)
    out.float().square().sum().backward()
    grads = [t.grad.float().clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return [out.float().detach()] + grads


def inputs(h, hk, tq, tk, dtype):
    torch.manual_seed(tq + h)
    return [torch.randn(2, n, t, 64, device="cuda", dtype=dtype).requires_grad_()
            for n, t in ((h, tq), (hk, tk), (hk, tk))]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
def test_plain_causal_cuda(dtype, tol, heads):
    t = 512
    tensors = inputs(*heads, t, t, dtype)
    pos = torch.arange(t, device="cuda")
    ref = fwd_bwd(lambda q, k, v: masked_reference(q, k, v, pos, pos, t), tensors)
    got = fwd_bwd(lambda q, k, v: attend(q, k, v, pos, pos, t, None, None, plain_causal=True), tensors)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("docs", [False, True], ids=["band", "band+docs"])
def test_flex_block_mask_cuda(dtype, tol, docs):
    prefix, tq, window = 255, 256, 256
    tensors = inputs(8, 2, tq, prefix + tq, dtype)
    q_pos = torch.arange(prefix, prefix + tq, device="cuda")
    k_pos = torch.arange(prefix + tq, device="cuda")
    k_doc = q_doc = None
    if docs:
        k_doc = torch.cumsum(torch.rand(2, prefix + tq, device="cuda") < 0.01, 1)
        q_doc = k_doc[:, prefix:]
    ref = fwd_bwd(lambda q, k, v: masked_reference(q, k, v, q_pos, k_pos, window, q_doc, k_doc), tensors)
    got = fwd_bwd(lambda q, k, v: flex_masked(q, k, v, q_pos, k_pos, window, q_doc, k_doc), tensors)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)
