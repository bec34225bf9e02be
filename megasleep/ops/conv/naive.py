"""Token-by-token reference of the causal depthwise short convolution, and the single-token step.

``x [B,D,T]``, ``weight [D,W]``, ``bias [D]`` or None; ``out[:, :, t] = act(bias + sum_j weight[:, j]
* x[:, :, t - (W-1) + j])`` (the same orientation as ``torch.nn.Conv1d`` / ``causal_conv1d_fn``:
``weight[:, -1]`` multiplies the current token). The conv state ``[B,D,W-1]`` holds the last W-1
inputs, zeros where there were none or before a reset (taps that reach before a document start
read zeros).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import check_reset, compute_dtype


def _act(y, activation):
    if activation is None:
        return y
    if activation in ("silu", "swish"):
        return F.silu(y)
    raise ValueError(f"activation must be None or 'silu', got {activation!r}")


def _check(x, weight):
    if x.dim() != 3:
        raise ValueError(f"x must be [B,D,T], got shape {list(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"weight must be [D,W] with D={x.shape[1]}, got {list(weight.shape)}")


def causal_conv1d_naive(x, weight, bias=None, initial_state=None, reset=None, activation=None):
    """Reference (a Python loop over T). Returns ``(out [B,D,T] in x.dtype, state [B,D,W-1] fp32)``."""
    _check(x, weight)
    b, d, t = x.shape
    w = weight.shape[1]
    reset = check_reset(reset, b, t)
    _act(x.new_zeros(()), activation)  # validate early
    cd = compute_dtype(x, weight, bias, initial_state)
    xf, wf = x.to(cd), weight.to(cd)
    bf = bias.to(cd) if bias is not None else None
    buf = x.new_zeros(b, d, w - 1, dtype=cd) if initial_state is None else initial_state.to(cd)
    outs = []
    for i in range(t):
        if reset is not None:
            buf = torch.where(reset[:, i, None, None], torch.zeros_like(buf), buf)
        o, buf = _update(buf, xf[:, :, i], wf, bf, activation)
        outs.append(o)
    out = torch.stack(outs, dim=-1) if outs else xf.new_zeros(b, d, 0)
    return out.to(x.dtype), buf


def _update(buf, x, weight, bias, activation):
    full = torch.cat([buf, x[..., None]], dim=-1)  # [b,d,W]
    y = (full * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return _act(y, activation), full[..., 1:]


def causal_conv1d_step_torch(x, state, weight, bias=None, activation=None):
    """One decoding step: x [B,D], state [B,D,W-1] (or None). Returns ``(out [B,D], new_state fp32)``."""
    b, d = x.shape
    w = weight.shape[1]
    cd = compute_dtype(x, weight, bias, state)
    buf = x.new_zeros(b, d, w - 1, dtype=cd) if state is None else state.to(cd)
    y, buf = _update(buf, x.to(cd), weight.to(cd), bias.to(cd) if bias is not None else None, activation)
    return y.to(x.dtype), buf
