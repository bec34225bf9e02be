"""Vectorised causal depthwise conv (pure PyTorch) with initial state and exact document resets.

``out[:, :, t] = sum_j weight[:, j] * xs[:, :, t + j]`` where ``xs = cat(initial_state, x)`` (W-1 +
T long), computed as W shifted multiply-adds (W is small). With ``reset``, tap ``j`` of token
``t`` reads input position ``pos = t - (W-1) + j`` (negative = initial state) and is kept only if
``pos >= start_t``, the index of the last reset at or before ``t`` (``-(W-1)`` if none): taps
reaching before the document start read zeros, exactly like the token loop. Without resets the
sum is one depthwise ``F.conv1d`` over ``xs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import check_reset, compute_dtype
from .naive import _act, _check


def _doc_start(reset: torch.Tensor, w: int) -> torch.Tensor:
    """[B,T] index of the last reset at or before t, or -(w-1) when there was none."""
    t = reset.shape[1]
    idx = torch.arange(t, device=reset.device).expand_as(reset)
    marks = torch.where(reset, idx, torch.full_like(idx, -(w - 1)))
    return torch.cummax(marks, dim=1).values


def conv_final_state(x, initial_state=None, reset=None, width=4, dtype=None):
    """The conv state after ``x [B,D,T]``: last W-1 inputs, zeros before the last reset/none seen."""
    b, d, t = x.shape
    cd = dtype or compute_dtype(x, initial_state)
    w1 = width - 1
    init = x.new_zeros(b, d, w1, dtype=cd) if initial_state is None else initial_state.to(cd)
    # contiguous: a view would keep the whole [B, D, W-1+T] input alive inside a decoding cache
    xs = torch.cat([init, x.to(cd)], dim=-1)[..., -w1:].contiguous() if w1 > 0 else init
    if reset is not None and w1 > 0 and t > 0:
        start = _doc_start(reset, width)[:, -1]  # [B]
        pos = torch.arange(t - w1, t, device=x.device)  # input positions held by the state
        keep = pos[None, :] >= start[:, None]  # [B, W-1]
        xs = xs * keep[:, None, :].to(cd)
    return xs


def causal_conv1d_chunk(x, weight, bias=None, initial_state=None, reset=None, activation=None):
    """Vectorised causal conv; same contract as :func:`causal_conv1d_naive`."""
    _check(x, weight)
    b, d, t = x.shape
    w = weight.shape[1]
    reset = check_reset(reset, b, t)
    _act(x.new_zeros(()), activation)
    cd = compute_dtype(x, weight, bias, initial_state)
    xf, wf = x.to(cd), weight.to(cd)
    init = x.new_zeros(b, d, w - 1, dtype=cd) if initial_state is None else initial_state.to(cd)
    xs = torch.cat([init, xf], dim=-1)  # [b,d,W-1+T]
    if reset is None:
        # without resets this is exactly a depthwise F.conv1d over the state-prefixed input: one
        # fused kernel (forward and backward) instead of W shifted multiply-adds
        out = F.conv1d(xs, wf[:, None, :], bias.to(cd) if bias is not None else None, groups=d)
        final = conv_final_state(x, initial_state, None, w, dtype=cd) if t > 0 else init
        return _act(out, activation).to(x.dtype), final
    start = _doc_start(reset, w)  # [b,t]
    tpos = torch.arange(t, device=x.device)
    out = None
    for j in range(w):
        keep = (tpos - (w - 1) + j)[None, :] >= start  # [b,t]
        tap = xs[..., j : j + t] * wf[:, j, None] * keep[:, None, :].to(cd)
        out = tap if out is None else out + tap
    if bias is not None:
        out = out + bias.to(cd)[:, None]
    out = _act(out, activation)
    final = conv_final_state(x, initial_state, reset, w, dtype=cd) if t > 0 else init
    return out.to(x.dtype), final
