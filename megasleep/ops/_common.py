"""Helpers shared by the ops: compute dtype, backend resolution, warn-once, stable segment sums."""

from __future__ import annotations

import warnings

import torch

BACKENDS = ("auto", "torch", "cuda")

_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    """Emit ``msg`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any input is fp64 (for tight tests), otherwise fp32: state math never runs in 16 bit."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_reset(reset: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor | None:
    if reset is None:
        return None
    if reset.shape != (batch, seqlen):
        raise ValueError(f"reset must have shape [B, T] = {[batch, seqlen]}, got {list(reset.shape)}")
    return reset.to(torch.bool)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: ``out[..., i, j] = sum_{k=j+1}^{i} x[..., k]`` for ``j <= i``, ``-inf`` above.

    Built with a masked cumsum (as ``mamba_ssm.modules.ssd_minimal.segsum``), never as a difference
    of cumsums, so ``-inf`` entries in ``x`` (resets) give exact ``-inf`` (exp -> 0) and never NaN.
    """
    q = x.size(-1)
    xx = x.unsqueeze(-1).expand(*x.shape, q)  # xx[..., i, j] = x[..., i]
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0.0)
    out = torch.cumsum(xx, dim=-2)
    incl = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~incl, float("-inf"))


def apply_reset_to_logdecay(logdecay: torch.Tensor, reset: torch.Tensor | None) -> torch.Tensor:
    """Set the log-decay to ``-inf`` where ``reset`` is True (``logdecay`` is ``[B, T, H]``)."""
    if reset is None:
        return logdecay
    return logdecay.masked_fill(reset.unsqueeze(-1), float("-inf"))


def use_cuda(backend: str, x: torch.Tensor, getter, what: str) -> bool:
    """Resolve ``backend`` for tensor ``x`` given a ``_peers`` getter returning ``(fn, reason)``."""
    check_backend(backend)
    if backend == "torch":
        return False
    if backend == "cuda":
        if not x.is_cuda:
            raise RuntimeError(f"{what}: backend='cuda' needs CUDA tensors, got device {x.device}")
        fn, why = getter()
        if fn is None:
            raise RuntimeError(f"{what}: backend='cuda' unavailable: {why}")
        return True
    return x.is_cuda and getter()[0] is not None


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
