"""The whole Mamba-2 mixer on its fast CPU paths (fused channels-last conv, chunked SSD with the
hand-written recurrence and segment sums, fused gated norm) against the same mixer built from the
references (token-loop conv and SSD, plain-autograd gated norm): outputs, final states and every
gradient (parameters, input, initial conv and SSM states), fp64, with and without document resets."""

import pytest
import torch

from megasleep.models import mamba2 as m2
from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.norm import gated_rms_norm_reference
from megasleep.ops.conv import causal_conv1d_naive
from megasleep.ops.ssd import ssd_naive
from megasleep.ops.testing import random_reset
from tests.conftest import tiny_model


def _mixer():
    model = tiny_model("M", dtype=torch.float64)
    return next(m for m in model.modules() if isinstance(m, m2.Mamba2))


def _use_references(monkeypatch) -> list[str]:
    """Swap the mixer's ops for the references; returns the log of reference calls."""
    calls = []

    def conv(x, w, b, initial_state=None, reset=None, activation=None, backend="auto"):
        calls.append("conv")
        return causal_conv1d_naive(x, w, b, initial_state, reset, activation)

    def scan(*a, chunk_size=None, backend="auto", **k):
        calls.append("ssd")
        return ssd_naive(*a, **k)

    def norm(self, y, z):
        calls.append("norm")
        return gated_rms_norm_reference(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)

    monkeypatch.setattr(m2, "causal_conv1d", conv)
    monkeypatch.setattr(m2, "ssd", scan)
    monkeypatch.setattr(m2.GatedRMSNorm, "forward", norm)
    return calls


def _run(mixer, u, cache, ctx):
    mixer.zero_grad(set_to_none=True)
    leaves = [u.clone().requires_grad_(), cache.ssm.clone().requires_grad_(), cache.conv[0].clone().requires_grad_()]
    out, new = mixer(leaves[0], LayerCache(ssm=leaves[1], conv=(leaves[2],)), ctx)
    gen = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (new.ssm * torch.randn(new.ssm.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (new.conv[0] * torch.randn(new.conv[0].shape, generator=gen, dtype=out.dtype)).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
    grads.update(u=leaves[0].grad, ssm0=leaves[1].grad, conv0=leaves[2].grad)
    return [out.detach(), new.ssm.detach(), new.conv[0].detach()], grads


@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_mixer_matches_reference_ops_fp64(monkeypatch, with_reset):
    mixer = _mixer()
    b, t = 2, 37  # not a multiple of the chunk size
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(b, t, mixer.d_model, generator=gen, dtype=torch.float64)
    cache = mixer.init_cache(b, dtype=torch.float64)
    cache = LayerCache(ssm=torch.randn(cache.ssm.shape, generator=gen, dtype=torch.float64),
                       conv=(torch.randn(cache.conv[0].shape, generator=gen, dtype=torch.float64),))
    reset = random_reset(b, t, p=0.1, seed=3) if with_reset else None
    ctx = MixContext.for_span(0, t, t, reset=reset, backend="torch")
    fast = _run(mixer, u, cache, ctx)
    calls = _use_references(monkeypatch)
    ref = _run(mixer, u, cache, ctx)
    assert calls == ["conv", "ssd", "norm"]
    for name, a, c in zip(("out", "ssm state", "conv state"), ref[0], fast[0]):
        torch.testing.assert_close(c, a, atol=1e-10, rtol=1e-10, msg=name)
    for name in ref[1]:
        torch.testing.assert_close(fast[1][name], ref[1][name], atol=1e-10, rtol=1e-9, msg=f"grad {name}")
