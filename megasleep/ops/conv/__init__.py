"""Causal depthwise short conv: ``causal_conv1d_naive`` (token loop), ``causal_conv1d_chunk``
(vectorised torch, CPU default), ``causal_conv1d_step`` (one token), dispatcher ``causal_conv1d``."""

from __future__ import annotations

import torch

from .. import _peers
from .._common import needs_grad, use_cuda
from .chunk import causal_conv1d_chunk, conv_final_state
from .naive import causal_conv1d_naive, causal_conv1d_step_torch

__all__ = ["causal_conv1d", "causal_conv1d_chunk", "causal_conv1d_naive", "causal_conv1d_step", "conv_final_state"]


def causal_conv1d(x, weight, bias=None, initial_state=None, reset=None, activation=None, backend="auto"):
    """Causal conv over ``x [B,D,T]``. ``backend``: "auto" (``causal_conv1d_fn`` when on CUDA and the
    compiled extension imports, else torch), "torch" (``causal_conv1d_chunk``), "cuda" (raises if the
    kernel is missing or cannot do this case). Returns ``(out in x.dtype, state [B,D,W-1] fp32)``."""
    if backend == "auto" and x.dtype == torch.float64:
        backend = "torch"
    if use_cuda(backend, x, _peers.causal_conv1d_fn, "causal_conv1d"):
        from .cuda import causal_conv1d_cuda

        return causal_conv1d_cuda(x, weight, bias, initial_state, reset, activation, strict=backend == "cuda")
    return causal_conv1d_chunk(x, weight, bias, initial_state, reset, activation)


def causal_conv1d_step(x, state, weight, bias=None, activation=None, backend="auto"):
    """One token: ``x [B,D]``, ``state [B,D,W-1]`` (None = zeros). Returns ``(out [B,D], new_state fp32)``.
    The CUDA kernel (``causal_conv1d_update``) has no backward: "auto" uses torch when a gradient is needed."""
    if backend == "auto" and (needs_grad(x, state, weight, bias) or x.dtype == torch.float64):
        backend = "torch"
    if use_cuda(backend, x, _peers.causal_conv1d_update, "causal_conv1d_step"):
        from .cuda import causal_conv1d_step_cuda

        return causal_conv1d_step_cuda(x, state, weight, bias, activation)
    return causal_conv1d_step_torch(x, state, weight, bias, activation)
