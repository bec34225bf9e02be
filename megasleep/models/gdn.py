"""Gated DeltaNet mixer (docs/sleep.md#mixers), parameter names as fla.layers.GatedDeltaNet.

S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t, with L2-normalised q, k,
alpha_t = exp(g_t), g_t = -exp(A_log) softplus(a_proj x + dt_bias), beta_t = sigmoid(b_proj x) (times 2 with
``allow_neg_eigval``: beta in [0, 2], so I - beta k k^T can have the eigenvalue 1 - beta < 0), a short
conv + SiLU on q, k, v, and o = o_proj(RMSNorm(o) * SiLU(g_proj x)). The state is kept in FLA's layout
[B, H, K, V] (= the S of docs/sleep.md#mixers, transposed), and the query is scaled by K^-1/2 as FLA does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.config import ModelConfig
from megasleep.models.mamba2 import init_dt_bias
from megasleep.models.norm import GatedRMSNorm, upcast
from megasleep.ops.conv import causal_conv1d, causal_conv1d_step
from megasleep.ops.gated_delta import gated_delta_rule, gdn_step


def clamp_l2norm(x: Tensor) -> Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def fla_l2norm(x: Tensor) -> Tensor:
    """FLA's l2norm (and transformers' copy of it), which checkpoints trained with FLA kernels expect."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


class ShortConv(nn.Conv1d):
    """Depthwise causal conv (weights [D, 1, W]), named like FLA's ShortConvolution: GDN's q/k/v convs
    (SiLU, no bias) and attention's optional q/k/v conv (bias, no activation, as mamba_ssm's MHA)."""

    def __init__(self, dim: int, width: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(dim, dim, width, groups=dim, padding=width - 1, bias=bias)
        self.activation = activation

    def run(self, x: Tensor, state: Tensor | None, ctx: MixContext) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> (act(conv(x)) [B, T, D], conv state [B, D, W-1])."""
        w = self.weight.squeeze(1)
        if x.shape[1] == 1 and state is not None and ctx.reset is None:
            y, new = causal_conv1d_step(x[:, 0], state, w, self.bias, self.activation, backend=ctx.backend)
            return y[:, None], new
        y, new = causal_conv1d(x.transpose(1, 2), w, self.bias, initial_state=state, reset=ctx.reset,
                               activation=self.activation, backend=ctx.backend)
        return y.transpose(1, 2), new


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g = cfg.gdn
        d = cfg.d_model
        self.n_heads, self.head_k_dim = g.n_heads, g.head_dim
        self.head_v_dim = int(g.head_dim * g.expand_v)
        self.key_dim, self.value_dim = self.n_heads * self.head_k_dim, self.n_heads * self.head_v_dim
        self.d_conv, self.chunk_size = g.d_conv, g.chunk_size
        self.beta_scale = 2.0 if g.allow_neg_eigval else 1.0
        self.l2norm = fla_l2norm if g.l2norm == "fla" else clamp_l2norm
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.a_proj = nn.Linear(d, self.n_heads, bias=False)
        self.b_proj = nn.Linear(d, self.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(init_dt_bias(self.n_heads, 0.001, 0.1, 1e-4))
        self.q_conv1d = ShortConv(self.key_dim, g.d_conv)
        self.k_conv1d = ShortConv(self.key_dim, g.d_conv)
        self.v_conv1d = ShortConv(self.value_dim, g.d_conv)
        self.g_proj = nn.Linear(d, self.value_dim, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=g.norm_eps or cfg.norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)
        for p in (self.A_log, self.dt_bias):
            p._no_weight_decay = True
            p._keep_fp32 = True

    def init_cache(self, batch: int, device=None, dtype=None) -> LayerCache:
        w = self.d_conv - 1
        return LayerCache(
            ssm=torch.zeros(batch, self.n_heads, self.head_k_dim, self.head_v_dim, device=device),
            conv=tuple(torch.zeros(batch, dim, w, device=device, dtype=dtype)
                       for dim in (self.key_dim, self.key_dim, self.value_dim)))

    def forward(self, x: Tensor, cache: LayerCache, ctx: MixContext) -> tuple[Tensor, LayerCache]:
        B, T, _ = x.shape
        cq, ck, cv = cache.conv or (None, None, None)
        q, cq = self.q_conv1d.run(self.q_proj(x), cq, ctx)
        k, ck = self.k_conv1d.run(self.k_proj(x), ck, ctx)
        v, cv = self.v_conv1d.run(self.v_proj(x), cv, ctx)
        q = self.l2norm(upcast(q.view(B, T, self.n_heads, self.head_k_dim)))
        k = self.l2norm(upcast(k.view(B, T, self.n_heads, self.head_k_dim)))
        v = v.view(B, T, self.n_heads, self.head_v_dim)
        g = -torch.exp(upcast(self.A_log)) * F.softplus(upcast(self.a_proj(x)) + upcast(self.dt_bias))
        beta = torch.sigmoid(upcast(self.b_proj(x)))
        if self.beta_scale != 1.0:
            beta = beta * self.beta_scale
        scale = self.head_k_dim ** -0.5
        if T == 1 and ctx.reset is None and cache.ssm is not None:
            o, state = gdn_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], scale, cache.ssm,
                                backend=ctx.backend)
            o = o[:, None]
        else:
            o, state = gated_delta_rule(q.to(v.dtype), k.to(v.dtype), v, g, beta, scale=scale,
                                        initial_state=cache.ssm, reset=ctx.reset,
                                        chunk_size=self.chunk_size, backend=ctx.backend)
        o = self.o_norm(o.to(x.dtype), self.g_proj(x).view(B, T, self.n_heads, self.head_v_dim))
        return self.o_proj(o.reshape(B, T, self.value_dim)), LayerCache(ssm=state, conv=(cq, ck, cv))
