"""Vectorised causal depthwise conv (pure PyTorch) with initial state and exact document resets.

``out[:, :, t] = sum_j weight[:, j] * xs[:, :, t + j]`` where ``xs = cat(initial_state, x)`` (W-1 +
T long), computed as W shifted multiply-adds (W is small). With ``reset``, tap ``j`` of token
``t`` reads input position ``pos = t - (W-1) + j`` (negative = initial state) and is kept only if
``pos >= start_t``, the index of the last reset at or before ``t`` (``-(W-1)`` if none): taps
reaching before the document start read zeros, exactly like the token loop. The arithmetic and its
hand-written backward are in :mod:`.fused` (channels-last, SiLU fused).
"""

from __future__ import annotations

import torch

from .._common import check_reset, compute_dtype
from .fused import CausalConvChannelsLast
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
    # only the last W-1 inputs are read (not a copy of the whole sequence); contiguous, so that the
    # state does not keep the whole input alive inside a decoding cache
    xs = torch.cat([init, x[..., max(t - w1, 0):].to(cd)], dim=-1)[..., -w1:].contiguous() if w1 > 0 else init
    if reset is not None and w1 > 0 and t > 0:
        start = _doc_start(reset, width)[:, -1]  # [B]
        pos = torch.arange(t - w1, t, device=x.device)  # input positions held by the state
        keep = pos[None, :] >= start[:, None]  # [B, W-1]
        xs = xs * keep[:, None, :].to(cd)
    return xs


def causal_conv1d_chunk(x, weight, bias=None, initial_state=None, reset=None, activation=None):
    """Vectorised causal conv; same contract as :func:`causal_conv1d_naive`. The output is a ``[B,D,T]``
    view of channels-last (``[B,T,D]``) storage: free to ``transpose(1, 2)`` back, as models do."""
    _check(x, weight)
    b, d, t = x.shape
    w = weight.shape[1]
    reset = check_reset(reset, b, t)
    _act(x.new_zeros(()), activation)  # validate early
    cd = compute_dtype(x, weight, bias, initial_state)
    keep = None
    if reset is not None and t > 0:
        start = _doc_start(reset, w)  # [b,t]
        tpos = torch.arange(t, device=x.device)
        keep = [((tpos - (w - 1) + j)[None, :] >= start).to(cd)[..., None] for j in range(w - 1)]
    init = None if initial_state is None else initial_state.transpose(1, 2)
    out = CausalConvChannelsLast.apply(x.transpose(1, 2), weight, bias, init, keep,
                                       activation is not None, cd)
    if t == 0:
        final = x.new_zeros(b, d, w - 1, dtype=cd) if initial_state is None else initial_state.to(cd)
    else:
        final = conv_final_state(x, initial_state, reset, w, dtype=cd)
    return out.transpose(1, 2), final
