"""The fused LM-head cross-entropy on CUDA (its GPU chunk size, bf16 autocast and bf16 weights) vs the
full-logits reference on the CPU in fp64: at least as accurate as the unfused bf16 head on CUDA."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("CUDA is not available (torch.cuda.is_available() is False)", allow_module_level=True)

from megasleep.ops.linear_ce import linear_cross_entropy_chunk, linear_cross_entropy_naive  # noqa: E402
from tests.ops.test_linear_ce import assert_as_accurate, inputs, loss_and_grads  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_linear_ce_cuda(grad_in_forward, mode):
    h, w, tgt, mask = inputs(n_b=4, n_t=512, d=256, vocab=50_257, dtype=torch.float32, seed=11)
    truth = loss_and_grads(linear_cross_entropy_naive, h.double(), w.double(), tgt, mask)
    hc, wc, tc, mc = h.cuda(), w.cuda(), tgt.cuda(), mask.cuda()
    if mode == "bf16-weights":
        hc, wc = hc.bfloat16(), wc.bfloat16()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "autocast"):
        ref = loss_and_grads(linear_cross_entropy_naive, hc, wc, tc, mc)
        got = loss_and_grads(linear_cross_entropy_chunk, hc, wc, tc, mc, grad_in_forward=grad_in_forward)
    for a, b, t, what in zip(got, ref, truth, ("loss", "dh", "dW")):
        assert a.dtype == b.dtype, what
        assert_as_accurate(a.cpu(), b.cpu(), t, what)
