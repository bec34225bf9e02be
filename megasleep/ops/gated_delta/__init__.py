"""Gated delta rule (FLA layout): ``gdn_naive`` (token loop), ``gdn_chunk`` (torch WY/UT chunked,
CPU default), ``gdn_step`` (one token) and the dispatcher ``gated_delta_rule``."""

from __future__ import annotations

import torch

from .. import _peers
from .._common import needs_grad, use_cuda, warn_once
from .chunk import gdn_chunk
from .naive import gdn_naive, gdn_step_torch

__all__ = ["gated_delta_rule", "gdn_chunk", "gdn_naive", "gdn_step"]


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, reset=None, backend="auto", chunk_size=64):
    """Gated delta rule over a sequence. ``backend``: "auto" (fla's ``chunk_gated_delta_rule`` when
    on CUDA and importable, else torch), "torch" (``gdn_chunk``), "cuda" (raises if missing)."""
    if backend == "auto" and q.dtype == torch.float64:
        backend = "torch"  # the Triton kernels do not take fp64
    if use_cuda(backend, q, _peers.fla_chunk_gated_delta_rule, "gated_delta_rule"):
        bad_bwd = _peers.fla_gdn_backward_problem() if needs_grad(q, k, v, g, beta, initial_state) else None
        if bad_bwd is None:
            from .cuda import gdn_cuda

            return gdn_cuda(q, k, v, g, beta, scale, initial_state, reset, chunk_size=chunk_size)
        if backend == "cuda":
            raise RuntimeError(f"gated_delta_rule: backend='cuda' cannot give gradients here: {bad_bwd}")
        warn_once("gdn-bwd", f"gated_delta_rule: {bad_bwd}; using the torch chunk path when gradients are needed")
    return gdn_chunk(q, k, v, g, beta, scale, initial_state, reset, chunk_size=chunk_size)


def gdn_step(q, k, v, g, beta, scale, state, backend="auto"):
    """One token: ``q, k [B,H,K]``, ``v [B,H,V]``, ``g, beta [B,H]``, ``state [B,H,K,V]`` (None =
    zeros). Returns ``(o [B,H,V] in v.dtype, new_state fp32)``. fla's fused recurrent kernel has no
    backward, so "auto" uses torch whenever a gradient is needed."""
    if backend == "auto" and (needs_grad(q, k, v, g, beta, state) or q.dtype == torch.float64):
        backend = "torch"
    if use_cuda(backend, q, _peers.fla_fused_recurrent_gated_delta_rule, "gdn_step"):
        from .cuda import gdn_step_cuda

        return gdn_step_cuda(q, k, v, g, beta, scale, state)
    return gdn_step_torch(q, k, v, g, beta, scale, state)
