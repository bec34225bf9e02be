"""Mamba-2 mixer (docs/sleep.md#mixers) with an explicit initial state and returned final state.

Parameter names and shapes are those of ``mamba_ssm.modules.mamba2.Mamba2`` (in_proj, conv1d, dt_bias,
A_log, D, norm, out_proj; in_proj output ordered z | xBC | dt), so its checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.config import ModelConfig
from megasleep.models.norm import GatedRMSNorm, upcast
from megasleep.ops.conv import causal_conv1d, causal_conv1d_step
from megasleep.ops.ssd import ssd, ssd_step


def init_dt_bias(n: int, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """Inverse softplus of dt ~ logU[dt_min, dt_max] (mamba_ssm's initialisation)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.mamba2
        self.d_model, self.d_state, self.d_conv, self.ngroups = cfg.d_model, m.d_state, m.d_conv, m.ngroups
        self.d_inner = self.d_ssm = m.expand * cfg.d_model
        self.headdim = m.headdim
        self.nheads = self.d_ssm // m.headdim
        self.chunk_size = m.chunk_size
        self.conv_dim = self.d_ssm + 2 * m.ngroups * m.d_state
        d_in_proj = 2 * self.d_inner + 2 * m.ngroups * m.d_state + self.nheads
        self.in_proj = nn.Linear(cfg.d_model, d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim,
                                padding=m.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads, m.dt_min, m.dt_max, m.dt_init_floor))
        lo, hi = m.A_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_ssm, eps=m.norm_eps, group_size=self.d_ssm // m.ngroups,
                                 norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
            p._keep_fp32 = True  # SSM-sensitive: stays fp32 under bf16 training

    def init_cache(self, batch: int, device=None, dtype=None) -> LayerCache:
        return LayerCache(
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device),
            conv=(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),))

    def _split(self, zxbcdt: Tensor):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def forward(self, u: Tensor, cache: LayerCache, ctx: MixContext) -> tuple[Tensor, LayerCache]:
        B, T, _ = u.shape
        z, xBC, dt = self._split(self.in_proj(u))
        weight = self.conv1d.weight.squeeze(1)
        conv0 = cache.conv[0] if cache.conv else None
        A = -torch.exp(upcast(self.A_log))
        if T == 1 and ctx.reset is None and conv0 is not None and cache.ssm is not None:
            # single-token wake step: recurrent kernels, no chunking
            xBC1, conv_new = causal_conv1d_step(xBC[:, 0], conv0, weight, self.conv1d.bias, "silu",
                                                backend=ctx.backend)
            x, Bm, Cm = torch.split(xBC1, [self.d_ssm, self.ngroups * self.d_state,
                                           self.ngroups * self.d_state], dim=-1)
            dt1 = F.softplus(upcast(dt[:, 0]) + upcast(self.dt_bias))
            y, state = ssd_step(x.view(B, self.nheads, self.headdim), dt1, A,
                                Bm.view(B, self.ngroups, self.d_state), Cm.view(B, self.ngroups, self.d_state),
                                self.D, cache.ssm, backend=ctx.backend)
            y = y.reshape(B, 1, self.d_ssm)
        else:
            xBC_t, conv_new = causal_conv1d(xBC.transpose(1, 2), weight, self.conv1d.bias, initial_state=conv0,
                                            reset=ctx.reset, activation="silu", backend=ctx.backend)
            x, Bm, Cm = torch.split(xBC_t.transpose(1, 2), [self.d_ssm, self.ngroups * self.d_state,
                                                           self.ngroups * self.d_state], dim=-1)
            dt = F.softplus(upcast(dt) + upcast(self.dt_bias))
            y, state = ssd(x.reshape(B, T, self.nheads, self.headdim), dt, A,
                           Bm.reshape(B, T, self.ngroups, self.d_state), Cm.reshape(B, T, self.ngroups, self.d_state),
                           D=self.D, initial_state=cache.ssm, reset=ctx.reset, chunk_size=self.chunk_size,
                           backend=ctx.backend)
            y = y.reshape(B, T, self.d_ssm)
        y = self.norm(y.to(u.dtype), z)
        return self.out_proj(y), LayerCache(ssm=state, conv=(conv_new,))
