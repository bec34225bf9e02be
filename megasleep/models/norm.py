"""RMS norms. ``GatedRMSNorm`` follows mamba_ssm's RMSNormGated (grouped, gate before or after the norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megasleep.ops._common import compute_dtype


def upcast(x: Tensor) -> Tensor:
    """At least fp32 for reductions and state math; fp64 stays fp64 (tight reference tests)."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, group_size: int | None = None) -> Tensor:
    dtype = x.dtype
    x = upcast(x)
    if group_size is not None and group_size != x.shape[-1]:
        shape = x.shape
        x = x.view(*shape[:-1], shape[-1] // group_size, group_size)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        x = x.view(shape)
    else:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        x = x * weight.to(x.dtype)
    return x.to(dtype)


def gated_rms_norm_reference(y: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int | None = None,
                             norm_before_gate: bool = False) -> Tensor:
    """Plain-autograd gated RMSNorm in fp32 throughout (fp64 stays fp64), as mamba_ssm's ``rms_norm_ref``
    with ``upcast=True``; the output in ``y.dtype``. The reference :class:`GatedRMSNormFn` is tested
    against, and what :class:`GatedRMSNorm` runs under ``torch.compile``."""
    gate = F.silu(upcast(z))
    h = upcast(y) if norm_before_gate else upcast(y) * gate
    out = rms_norm(h, weight, eps, group_size)
    return (out * gate if norm_before_gate else out).to(y.dtype)


class GatedRMSNormFn(torch.autograd.Function):
    """Gated RMSNorm with a hand-written backward: a handful of passes over memory where autograd
    records about fifteen ops (each a pass, most saving a full-size tensor).

    ``norm_before_gate=False``: ``h = y * silu(z)``, ``out = h * r * w`` with ``r = rsqrt(mean_g(h^2) + eps)``
    over each group; True: ``h = y``, ``out = h * r * w * silu(z)``. With ``hn = h * r`` and ``a`` the
    gradient reaching ``hn``, the norm's backward is ``grad_h = r * (a - hn * mean_g(a * hn))``.
    Arithmetic in fp32 (fp64 for fp64 inputs, see :func:`upcast`); the output is in ``y.dtype``.
    """

    @staticmethod
    def forward(ctx, y, z, weight, eps, group_size, norm_before_gate):
        shape = y.shape
        gs = group_size or shape[-1]
        cd = compute_dtype(y, z, weight)
        grouped = (*shape[:-1], shape[-1] // gs, gs)
        gate = F.silu(z.to(cd))
        h = y.to(cd, copy=True) if norm_before_gate else y.to(cd) * gate
        h = h.view(grouped)
        r = torch.rsqrt(torch.linalg.vecdot(h, h).unsqueeze(-1) / gs + eps)  # [..., G, 1]
        hn = h.mul_(r).view(shape)
        wf = weight.to(cd)
        out = hn * wf
        if norm_before_gate:
            out.mul_(gate)
        # gate saved rather than recomputed: silu is one of the slower passes on CPU
        ctx.save_for_backward(y, z, weight, hn, r, gate)
        ctx.gs, ctx.norm_before_gate = gs, norm_before_gate
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, z, weight, hn, r, gate = ctx.saved_tensors
        gs, before = ctx.gs, ctx.norm_before_gate
        cd = hn.dtype
        shape, grouped = hn.shape, (*hn.shape[:-1], hn.shape[-1] // gs, gs)
        go = grad.to(cd).reshape(shape)
        wf = weight.to(cd)
        g_gate = None
        if before:
            g_gate = go * hn
            g_gate.mul_(wf)  # gradient reaching silu(z)
            go = go * gate
        buf = go * hn  # one scratch buffer, reused in place below
        gw = buf.sum(tuple(range(buf.dim() - 1)))
        a = torch.mul(go, wf, out=buf).view(grouped)  # gradient reaching hn
        hn_g = hn.view(grouped)
        dot = torch.linalg.vecdot(a, hn_g).unsqueeze(-1) / gs
        gh = a.mul_(r).addcmul_(hn_g, dot * r, value=-1).view(shape)  # gradient reaching h
        if before:
            gy = gh
        else:
            gy = gh * gate
            g_gate = gh.mul_(y.to(cd))
        gz = torch.ops.aten.silu_backward(g_gate, z.to(cd))
        return gy.to(y.dtype), gz.to(z.dtype), gw.to(weight.dtype), None, None, None


class GatedRMSNorm(nn.Module):
    """``norm_before_gate=False`` (Mamba-2): rmsnorm(y * silu(z)); True (GDN): rmsnorm(y) * silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        if y.shape != z.shape:
            raise ValueError(f"GatedRMSNorm: y {list(y.shape)} and gate z {list(z.shape)} must have one shape")
        if torch.compiler.is_compiling():
            # inductor fuses the plain ops itself, and dynamo in torch 2.11 computes wrong gradients
            # through this Function (measured: 100% off; right in 2.13)
            return gated_rms_norm_reference(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
        return GatedRMSNormFn.apply(y, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
