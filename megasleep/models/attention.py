"""Causal softmax attention with RoPE and grouped-query heads, restricted to the current window.

Keys are cached after RoPE at their absolute positions; since RoPE scores depend only on the
distance between query and key, this equals "positions counted inside the window" for hard eviction
and gives the right distances across the window boundary for sliding eviction (docs/sleep.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megasleep.models.attn_kernels import attend
from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.config import ModelConfig
from megasleep.models.gdn import ShortConv
from megasleep.models.rope import RopeCache, rope

__all__ = ["Attention", "rope"]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a = cfg.attn
        self.n_heads, self.n_kv_heads = a.n_heads, a.n_kv_heads or a.n_heads
        self.head_dim, self.theta, self.rotary_dim = cfg.attn_head_dim, a.rope_theta, a.rotary_dim
        self.scale = a.softmax_scale
        d = cfg.d_model
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=a.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=a.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=a.out_bias)
        qkv_dim = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_conv1d = ShortConv(qkv_dim, a.d_conv, bias=True, activation=None) if a.d_conv else None
        # OLMo's q/k norms: over the whole projected width (all heads together), not per head
        self.q_norm = nn.RMSNorm(self.n_heads * self.head_dim, eps=cfg.norm_eps) if a.qk_norm else None
        self.k_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=cfg.norm_eps) if a.qk_norm else None
        self.rope = RopeCache(self.head_dim, self.theta, self.rotary_dim)

    def init_cache(self, batch: int, device=None, dtype=None) -> LayerCache:
        return LayerCache()

    def forward(self, x: Tensor, cache: LayerCache, ctx: MixContext) -> tuple[Tensor, LayerCache]:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv = None
        if self.qkv_conv1d is not None:  # conv history: short-term memory, like the KV cache
            qkv, conv = self.qkv_conv1d.run(torch.cat([q, k, v], -1), cache.conv[0] if cache.conv else None, ctx)
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, ctx.positions, ctx.span), self.rope(k, ctx.positions, ctx.span)
        doc = ctx.doc_ids
        if cache.k is not None:
            k_all, v_all = torch.cat([cache.k, k], 2), torch.cat([cache.v, v], 2)
            pos_all = torch.cat([cache.pos, ctx.positions])
            if doc is not None or cache.doc is not None:
                doc_prev = cache.doc if cache.doc is not None else torch.zeros(
                    B, cache.k.shape[2], dtype=torch.long, device=x.device)
                doc_now = doc if doc is not None else torch.zeros(B, T, dtype=torch.long, device=x.device)
                doc_all = torch.cat([doc_prev, doc_now], 1)
            else:
                doc_all = None
        else:
            k_all, v_all, pos_all, doc_all = k, v, ctx.positions, doc
        # a query sees keys at most L-1 positions back, never ahead, and only in its own document;
        # with nothing cached and no documents inside one window that is exactly the causal mask
        plain_causal = cache.k is None and doc_all is None and ctx.span is not None and T <= ctx.window
        q_doc = None if doc_all is None else (doc_now if cache.k is not None else doc)
        o = attend(q, k_all, v_all, ctx.positions, pos_all, ctx.window, q_doc,
                   doc_all, plain_causal, scale=self.scale)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        keep = max(ctx.window - 1, 0)
        new = LayerCache(k=k_all[:, :, -keep:] if keep else k_all[:, :, :0],
                         v=v_all[:, :, -keep:] if keep else v_all[:, :, :0],
                         pos=pos_all[-keep:] if keep else pos_all[:0],
                         doc=None if doc_all is None else (doc_all[:, -keep:] if keep else doc_all[:, :0]),
                         conv=None if conv is None else (conv,))
        return self.o_proj(o), new
