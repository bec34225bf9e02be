"""SSD chunk on the strided inputs the Mamba-2 mixer hands it (x, B, C as slices of one conv output
``[B, T, H*P + 2*G*N]``): same outputs and gradients as on contiguous inputs, and as the token loop."""

import pytest
import torch

from megasleep.ops.ssd import ssd_chunk, ssd_naive
from megasleep.ops.testing import assert_all_close, make_ssd_inputs, random_reset, run_with_grads


def _as_the_mixer_passes(x, B, C, **rest):
    """x [b,t,h,p], B, C [b,t,g,n] -> views into one [b, t, h*p + 2*g*n] tensor (differentiable)."""
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    xbc = torch.cat([x.reshape(b, t, h * p), B.reshape(b, t, g * n), C.reshape(b, t, g * n)], dim=-1)
    xs, Bs, Cs = torch.split(xbc, [h * p, g * n, g * n], dim=-1)
    return dict(rest, x=xs.reshape(b, t, h, p), B=Bs.reshape(b, t, g, n), C=Cs.reshape(b, t, g, n))


@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_mixer_strides_match_naive(g, with_reset):
    b, t, h, p, n, q = 2, 40, 4, 3, 5, 16
    inp = make_ssd_inputs(b, t, h, p, g, n, seed=9 + g)
    reset = random_reset(b, t, seed=g) if with_reset else None

    def strided(**kw):
        kw = _as_the_mixer_passes(**kw)
        assert not kw["x"].is_contiguous()
        return ssd_chunk(**kw, reset=reset, chunk_size=q)

    ref = run_with_grads(ssd_naive, inp, reset=reset)
    test = run_with_grads(strided, inp)
    assert_all_close(ref, test, atol=1e-10, rtol=1e-10, what=f"strided ssd g={g} reset={with_reset}")
