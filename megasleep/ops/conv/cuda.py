"""Causal conv on CUDA through ``causal_conv1d`` (Dao-AILab), imported lazily via ``_peers``.

The kernel computes the output; the final state (the last W-1 inputs, masked before the last
reset) is sliced in PyTorch -- exact, cheap, differentiable, and it avoids the kernel's
"final states need channel-last x and no seq_idx" restrictions. Cases the kernel cannot do
(width outside 2..4, initial state or resets with D not a multiple of 8, resets together with an
initial state, fp64) fall back to the torch path with a one-time warning.
"""

from __future__ import annotations

import torch

from .. import _peers
from .._common import warn_once
from .chunk import causal_conv1d_chunk, conv_final_state


def _channel_last(x: torch.Tensor) -> torch.Tensor:
    """Same values, memory layout [B, T, D] (what the kernel needs for initial_states / seq_idx)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _kernel_input(x: torch.Tensor, need_channel_last: bool) -> torch.Tensor:
    """A layout the kernel accepts: channel-last (``x.stride(1) == 1``) needs D and the strides to be
    multiples of 8, channel-first needs ``x.stride(2) == 1``. A model usually passes
    ``h.transpose(1, 2)`` of a ``[B, T, D]`` activation, which is channel-last already."""
    b, d, t = x.shape
    cl = x.stride(1) == 1 and (x.stride(2) > 1 or t == 1)
    cl_ok = cl and d % 8 == 0 and x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0
    if need_channel_last:
        return x if cl_ok else _channel_last(x)
    if cl_ok or (x.stride(2) == 1 and not cl):
        return x
    return x.contiguous()


def kernel_limitation(x, weight, initial_state, reset) -> str | None:
    d, w = weight.shape
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x.dtype} is not supported by causal_conv1d_fn"
    if not 2 <= w <= 4:
        return f"width {w} is outside causal_conv1d_fn's 2..4"
    if (initial_state is not None or reset is not None) and d % 8 != 0:
        return f"channels D={d} not a multiple of 8 (needed for initial_states / seq_idx)"
    if initial_state is not None and reset is not None:
        return "resets together with an initial state (seq_idx + initial_states) are not used"
    return None


def causal_conv1d_cuda(x, weight, bias=None, initial_state=None, reset=None, activation=None, strict=False):
    fn, why = _peers.causal_conv1d_fn()
    if fn is None:
        raise RuntimeError(f"causal_conv1d backend='cuda' unavailable: {why}")
    lim = kernel_limitation(x, weight, initial_state, reset)
    if lim is not None:
        if strict:
            raise RuntimeError(f"causal_conv1d backend='cuda': {lim}")
        warn_once("conv-cuda-" + lim, f"causal_conv1d: {lim}; using the torch path")
        return causal_conv1d_chunk(x, weight, bias, initial_state, reset, activation)
    w = weight.shape[1]
    bias_ = bias.to(weight.dtype).contiguous() if bias is not None else None
    seq_idx = None
    init = None
    if reset is not None:
        seq_idx = torch.cumsum(reset, dim=1, dtype=torch.int32).contiguous()
    if initial_state is not None:
        init = _channel_last(initial_state.to(x.dtype))
    xin = _kernel_input(x, need_channel_last=reset is not None or initial_state is not None)
    out = fn(xin, weight.contiguous(), bias_, seq_idx=seq_idx, initial_states=init, activation=activation)
    final = conv_final_state(x, initial_state, reset, w, dtype=torch.float32)
    return out.to(x.dtype), final


def causal_conv1d_step_cuda(x, state, weight, bias=None, activation=None):
    """``causal_conv1d_update`` on a copy of the state (kept in x.dtype by the kernel)."""
    fn, why = _peers.causal_conv1d_update()
    if fn is None:
        raise RuntimeError(f"causal_conv1d_step backend='cuda' unavailable: {why}")
    b, d = x.shape
    w = weight.shape[1]
    S = torch.zeros(b, d, w - 1, device=x.device, dtype=x.dtype) if state is None else state.to(x.dtype).clone()
    out = fn(x, S, weight.contiguous(), bias.to(weight.dtype) if bias is not None else None, activation)
    return out.to(x.dtype), S.float()
