"""RMS norms. ``GatedRMSNorm`` follows mamba_ssm's RMSNormGated (grouped, gate before or after the norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class GatedRMSNorm(nn.Module):
    """``norm_before_gate=False`` (Mamba-2): rmsnorm(y * silu(z)); True (GDN): rmsnorm(y) * silu(z)."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        gate = F.silu(upcast(z))
        if self.norm_before_gate:
            return (upcast(rms_norm(y, self.weight, self.eps, self.group_size)) * gate).to(y.dtype)
        return rms_norm((upcast(y) * gate).to(y.dtype), self.weight, self.eps, self.group_size)
