"""Causal depthwise conv (+ optional SiLU) in channels-last layout with a hand-written backward.

A model holds the conv input as ``[B, T, D]`` (a slice of the input projection); the op's public
layout is ``[B, D, T]`` (``causal_conv1d_fn``'s), which models pass as ``h.transpose(1, 2)``. Working
on ``[B, T, D]`` rows directly, the W taps are W shifted multiply-adds over contiguous memory
(vectorised along D), and the result goes back as a ``[B, D, T]`` transposed view of channels-last
storage, so the caller's ``transpose(1, 2)`` is free. Autograd through ``F.conv1d`` + ``F.silu`` on
that layout pays for a transposed copy, a slow strided ``silu_backward`` and mkldnn's depthwise
backward; here the backward is a handful of passes over contiguous rows:

    g = grad * silu'(pre)                      (pre: the conv output before the activation)
    grad_xs[:, j:j+T] += g * w[:, j]           (xs = cat(initial_state, x) along T)
    grad_w[:, j] = sum_{B,T} g * xs[:, j:j+T],  grad_bias = sum_{B,T} g

Document resets mask taps: ``keep[j] [B, T, 1]`` is 1 where tap ``j`` of token ``t`` reads a
position of the token's own document (see :mod:`.chunk`), so a masked tap contributes nothing
forward and receives no gradient. Arithmetic runs in ``cd`` (fp32, or fp64 for reference tests);
the output comes back in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class CausalConvChannelsLast(torch.autograd.Function):
    """``forward(x [B,T,D], weight [D,W], bias [D] | None, init [B,W-1,D] | None, keep, silu, cd)``
    -> ``out [B,T,D]`` in ``x.dtype``. ``keep``: None or a list of W-1 ``[B,T,1]`` masks in ``cd``
    (the current-token tap is never masked)."""

    @staticmethod
    def forward(ctx, x, weight, bias, init, keep, silu, cd):
        b, t, d = x.shape
        w = weight.shape[1]
        xs = x.new_empty(b, w - 1 + t, d, dtype=cd)
        if init is None:
            xs[:, : w - 1].zero_()
        else:
            xs[:, : w - 1].copy_(init)
        xs[:, w - 1:].copy_(x)  # the only pass over x; converts bf16 -> cd on the way
        wf = weight.to(cd)
        if bias is None:
            pre = xs[:, w - 1:] * wf[:, w - 1]
        else:
            pre = torch.addcmul(bias.to(cd), xs[:, w - 1:], wf[:, w - 1])
        for j in range(w - 1):
            tap = xs[:, j: j + t] if keep is None else xs[:, j: j + t] * keep[j]
            pre.addcmul_(tap, wf[:, j])
        out = F.silu(pre) if silu else pre
        ctx.save_for_backward(xs, wf, pre if silu else None, *(keep or ()))
        ctx.meta = (silu, x.dtype, weight.dtype, None if bias is None else bias.dtype,
                    None if init is None else init.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        xs, wf, pre, *keep = ctx.saved_tensors
        silu, x_dtype, w_dtype, b_dtype, i_dtype = ctx.meta
        w = wf.shape[1]
        t = xs.shape[1] - (w - 1)
        g = grad.to(xs.dtype).contiguous()
        if silu:
            g = torch.ops.aten.silu_backward(g, pre)
        gxs = torch.empty_like(xs)
        torch.mul(g, wf[:, w - 1], out=gxs[:, w - 1:])
        gxs[:, : w - 1].zero_()
        gw = torch.empty_like(wf)
        gw[:, w - 1] = (g * xs[:, w - 1:]).sum((0, 1))
        for j in range(w - 1):
            gj = g if not keep else g * keep[j]
            gxs[:, j: j + t].addcmul_(gj, wf[:, j])
            gw[:, j] = (gj * xs[:, j: j + t]).sum((0, 1))
        need_x, need_w, need_b, need_i = ctx.needs_input_grad[:4]
        gx = gxs[:, w - 1:].to(x_dtype) if need_x else None
        gb = g.sum((0, 1)).to(b_dtype) if need_b else None
        gi = gxs[:, : w - 1].to(i_dtype) if need_i else None
        return gx, gw.to(w_dtype) if need_w else None, gb, gi, None, None, None
