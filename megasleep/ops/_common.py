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
    of cumsums, so ``-inf`` entries in ``x`` give exact ``-inf`` and never NaN. (Reference helper;
    the chunk kernels use :func:`chunk_decays`, which avoids ``-inf`` altogether.)
    """
    q = x.size(-1)
    xx = x.unsqueeze(-1).expand(*x.shape, q)  # xx[..., i, j] = x[..., i]
    strict = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=-1)
    xx = xx.masked_fill(~strict, 0.0)
    out = torch.cumsum(xx, dim=-2)
    incl = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~incl, float("-inf"))


def chunk_doc_index(reset: torch.Tensor | None, nchunks: int, q: int) -> torch.Tensor | None:
    """``[B, nchunks, Q]`` number of resets at or before each position *within its chunk*
    (``reset`` is ``[B, nchunks * Q]``, already padded); None when there are no resets."""
    if reset is None:
        return None
    return torch.cumsum(reset.view(reset.shape[0], nchunks, q).to(torch.int32), dim=-1)


def chunk_decays(la: torch.Tensor, doc: torch.Tensor | None = None):
    """Decay factors inside chunks, stable and exact at document resets.

    ``la [..., Q]`` finite log-decays (set to 0 at reset positions: their value never matters),
    ``doc [..., Q]`` (broadcastable) from :func:`chunk_doc_index` or None. Returns

    * ``L [..., Q, Q]``: ``exp(sum_{k=j+1}^{i} la_k)`` for ``j <= i`` in the same document, else 0;
    * ``din [..., Q]``: ``exp(sum_{k<=i} la_k)`` (decay from the chunk start) if no reset precedes
      ``i`` in the chunk, else 0.

    The segment sums are a masked cumsum (no difference of cumsums, as in mamba's ``segsum``);
    instead of ``-inf`` log-decays, positions across a reset are zeroed with a mask after ``exp``.
    That is exact, keeps every gradient finite, and avoids ``exp(-inf)``, which takes a slow path on
    CPU (about 5x slower than finite arguments).
    """
    q = la.size(-1)
    ones = torch.ones(q, q, dtype=torch.bool, device=la.device)
    strict = torch.tril(ones, diagonal=-1)
    seg = torch.cumsum(la.unsqueeze(-1) * strict.to(la.dtype), dim=-2)  # 0 on and above the diagonal
    keep = torch.tril(ones)
    if doc is not None:
        keep = keep & (doc.unsqueeze(-1) == doc.unsqueeze(-2))
    L = torch.exp(seg) * keep.to(la.dtype)
    din = torch.exp(torch.cumsum(la, dim=-1))
    if doc is not None:
        din = din * (doc == 0).to(la.dtype)
    return L, din


def apply_reset_to_logdecay(logdecay: torch.Tensor, reset: torch.Tensor | None, value: float = 0.0) -> torch.Tensor:
    """Overwrite the log-decay where ``reset`` is True (``logdecay`` is ``[B, T, H]``). The chunk
    kernels write 0 there and mask across resets (:func:`chunk_decays`); ``-inf`` is the other
    exact choice."""
    if reset is None:
        return logdecay
    return logdecay.masked_fill(reset.unsqueeze(-1), value)


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
