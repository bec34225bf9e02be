"""Helpers shared by the ops: compute dtype, backend resolution, warn-once, stable segment sums."""

from __future__ import annotations

import warnings

import torch

from . import _peers

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


def _split_cumsum(la: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cumsum(la)`` accumulated in fp64 and split into ``hi`` (its rounding to ``la.dtype``) and
    ``lo`` (the rest, in ``la.dtype``; 0 for fp64 inputs)."""
    cum = torch.cumsum(la, dim=-1, dtype=torch.float64)
    hi = cum.to(la.dtype)
    return hi, (cum - hi).to(la.dtype)


class _SegmentDecay(torch.autograd.Function):
    """``L[..., i, j] = exp(cum_i - cum_j)`` for ``j <= i`` where ``same_doc[..., i, j]`` (1 if None), else
    exactly 0; ``cum = cumsum(la)``.

    A plain difference of fp32 cumsums loses ``|cum| * eps`` in absolute terms (much more than the
    segment sum itself when a chunk starts with a strong decay), which is why the usual stable
    segment sum is a masked cumsum over the Q x Q matrix. Here ``cum`` is accumulated in fp64 and
    split into ``hi + lo`` (``hi`` its fp32 rounding, ``lo`` the rest); ``hi_i - hi_j`` is rounded
    once, ``lo_i - lo_j`` is tiny, so the segment sum is as exact as the masked cumsum, at a fraction
    of its cost: a few elementwise passes over Q x Q, and a backward of one product and two
    reductions (``d cum_i = sum_j G[i, j]``, ``d cum_j = -sum_i G[i, j]``, ``G = grad * L``) where
    autograd through a cumsum runs flip / cumsum / flip over Q x Q. Dropped entries (above the
    diagonal or across a reset) are zeroed by multiplying with a 0/1 mask (``tril_`` first, so that
    no entry above the diagonal can overflow to ``inf * 0``; a multiply is ~10x faster than
    ``masked_fill`` on CPU); their gradient is 0 because ``L`` is 0 there.
    """

    @staticmethod
    def forward(ctx, la, same_doc):
        hi, lo = _split_cumsum(la)
        L = hi.unsqueeze(-1) - hi.unsqueeze(-2)
        if la.dtype != torch.float64:
            L.add_(lo.unsqueeze(-1)).sub_(lo.unsqueeze(-2))
        L.tril_().exp_().tril_()
        if same_doc is not None:
            L.mul_(same_doc)
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, grad):
        (L,) = ctx.saved_tensors
        G = grad * L
        gcum = (G.sum(-1) - G.sum(-2)).double()
        # la_k enters cum_i for every i >= k: a reverse cumsum over the (short) last axis
        gla = gcum.flip(-1).cumsum(-1).flip(-1)
        return gla.to(L.dtype), None


def chunk_decays(la: torch.Tensor, doc: torch.Tensor | None = None):
    """Decay factors inside chunks, stable and exact at document resets.

    ``la [..., Q]`` finite log-decays (set to 0 at reset positions: their value never matters),
    ``doc [..., Q]`` (broadcastable) from :func:`chunk_doc_index` or None. Returns

    * ``L [..., Q, Q]``: ``exp(sum_{k=j+1}^{i} la_k)`` for ``j <= i`` in the same document, else 0;
    * ``din [..., Q]``: ``exp(sum_{k<=i} la_k)`` (decay from the chunk start) if no reset precedes
      ``i`` in the chunk, else 0.

    The segment sums are differences of a split fp64 cumsum (:class:`_SegmentDecay`); instead of
    ``-inf`` log-decays, positions across a reset are zeroed with a mask after ``exp``. That is
    exact, keeps every gradient finite, and avoids ``exp(-inf)``, which takes a slow path on CPU
    (about 5x slower than finite arguments).
    """
    same_doc = None if doc is None else (doc.unsqueeze(-1) == doc.unsqueeze(-2)).to(la.dtype)
    if torch.compiler.is_compiling():
        # the same split-cumsum segment sums in plain ops: inductor fuses them, and dynamo in torch 2.11
        # computes wrong gradients through _SegmentDecay (it returns a tensor it mutated in place and
        # saved; measured: 100% off; right in 2.13)
        hi, lo = _split_cumsum(la)
        keep = torch.ones(la.shape[-1], la.shape[-1], dtype=torch.bool, device=la.device).tril()
        seg = torch.where(keep, (hi.unsqueeze(-1) - hi.unsqueeze(-2)) + (lo.unsqueeze(-1) - lo.unsqueeze(-2)), 0)
        L = torch.where(keep, seg.exp(), 0)
        L = L if same_doc is None else L * same_doc
    else:
        L = _SegmentDecay.apply(la, same_doc)
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


def on_kernel_device(x: torch.Tensor) -> bool:
    """Whether ``x`` can go to the CUDA / Triton kernels: a CUDA tensor, or a CPU tensor once Triton's
    interpreter is set up (``_peers.triton_interpreting()``; the compiled-only kernels' getters still
    say they are missing, so those fall back or raise as without CUDA)."""
    return x.is_cuda or (_peers.triton_interpreting() and x.device.type == "cpu")


def use_cuda(backend: str, x: torch.Tensor, getter, what: str) -> bool:
    """Resolve ``backend`` for tensor ``x`` given a ``_peers`` getter returning ``(fn, reason)``."""
    check_backend(backend)
    if backend == "torch":
        return False
    if backend == "cuda":
        if not on_kernel_device(x):
            raise RuntimeError(f"{what}: backend='cuda' needs CUDA tensors, got device {x.device}")
        fn, why = getter()
        if fn is None:
            raise RuntimeError(f"{what}: backend='cuda' unavailable: {why}")
        return True
    return on_kernel_device(x) and getter()[0] is not None


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
