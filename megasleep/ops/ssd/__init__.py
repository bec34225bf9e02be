"""SSD (Mamba-2 scan): ``ssd_naive`` (token loop), ``ssd_chunk`` (torch, CPU default),
``ssd_step`` (one token) and the dispatcher ``ssd``. See ``naive.py`` for the contract."""

from __future__ import annotations

import torch

from .. import _peers
from .._common import needs_grad, use_cuda
from .chunk import ssd_chunk
from .naive import ssd_naive, ssd_step_torch

__all__ = ["ssd", "ssd_chunk", "ssd_naive", "ssd_step"]


def ssd(x, dt, A, B, C, D=None, initial_state=None, reset=None, backend="auto", chunk_size=64):
    """SSD over a sequence. ``backend``: "auto" (CUDA kernel when on CUDA and importable, else
    torch), "torch" (``ssd_chunk``), "cuda" (``mamba_chunk_scan_combined``; raises if missing)."""
    if backend == "auto" and x.dtype == torch.float64:
        backend = "torch"  # the Triton kernels do not take fp64
    if use_cuda(backend, x, _peers.mamba_chunk_scan_combined, "ssd"):
        from .cuda import ssd_cuda

        return ssd_cuda(x, dt, A, B, C, D, initial_state, reset, chunk_size=chunk_size)
    return ssd_chunk(x, dt, A, B, C, D, initial_state, reset, chunk_size=chunk_size)


def ssd_step(x, dt, A, B, C, D, state, backend="auto"):
    """One token: ``x [B,H,P]``, ``dt [B,H]``, ``B, C [B,G,N]``, ``state [B,H,P,N]`` (None = zeros).
    Returns ``(y [B,H,P] in x.dtype, new_state fp32)``. The CUDA kernel (``selective_state_update``)
    has no backward, so "auto" uses torch whenever a gradient is needed."""
    if backend == "auto" and (needs_grad(x, dt, A, B, C, D, state) or x.dtype == torch.float64):
        backend = "torch"
    if use_cuda(backend, x, _peers.selective_state_update, "ssd_step"):
        from .cuda import ssd_step_cuda

        return ssd_step_cuda(x, dt, A, B, C, D, state)
    return ssd_step_torch(x, dt, A, B, C, D, state)
