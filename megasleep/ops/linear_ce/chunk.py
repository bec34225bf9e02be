"""LM head + masked cross-entropy in row chunks: the ``[tokens, V]`` logits never exist in full.

Per chunk of rows: ``logits = h_c W^T`` (matmul dtype), softmax statistics in fp32, loss
``lse - logit[target]``. The gradient of CE w.r.t. the logits is ``softmax - onehot`` (times the token's
mask), so the backward is two matmuls per chunk: ``dh_c = G W`` and ``dW += G^T h_c``. Two modes:

* ``grad_in_forward=True``: the forward also computes ``dh`` and ``dW`` (3 matmuls in all, as an
  unfused head, and no second pass over the logits); backward only scales them by the incoming
  gradient. It keeps ``dh`` and an fp32 ``dW`` (``V x d``) alive until backward, so the sleep loop uses
  it where backward follows at once (the step's last window) or nothing is recomputed anyway.
* ``grad_in_forward=False``: the forward keeps only the per-row log-sum-exp; backward recomputes each
  chunk's logits (4 matmuls in all, like a checkpointed head, but without the ``[tokens, V]`` buffers).

Rows whose mask is 0 cost their matmul rows but add nothing. Under autocast the matmuls run in the
autocast dtype, as ``F.linear`` would; gradients come back in the dtypes of ``h`` and ``W``, with
``dW`` accumulated over chunks in fp32.
"""

from __future__ import annotations

import contextlib

import torch

from .._common import compute_dtype
from .naive import _check

# elements of one chunk's logits. On a CPU a chunk that stays in cache is fastest (measured at
# V = 8192, d = 256: 2^20 beat 2^19 and 2^21+ by 5-15%); a GPU wants big matmuls (2^26: 256 MiB in
# fp32, small next to the [tokens, V] logits it replaces). A chunk never has fewer than MIN_ROWS rows.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
MIN_ROWS = 32


def _autocast_on(dev: str) -> bool:
    return torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)


def _no_autocast(dev: str):
    """The explicit casts below replace autocast (``meta``, used by ``megasleep plan``, has none)."""
    return torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()


def _matmul_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if _autocast_on(dev) and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunks(n: int, vocab: int, chunk_elements: int) -> tuple[range, int]:
    rows = min(max(n, 1), max(MIN_ROWS, chunk_elements // max(vocab, 1)))
    return range(0, n, rows), rows


def _lse_(logits: torch.Tensor):
    """Row log-sum-exp of ``logits`` (a fresh buffer, overwritten by ``exp(logits - max)``); returns
    ``(lse, that buffer, its row sums)``: one pass fewer, and no second buffer, than ``torch.logsumexp``
    followed by a softmax."""
    m = logits.amax(1, keepdim=True)
    e = logits.sub_(m).exp_()
    total = e.sum(1, keepdim=True)
    return (m + total.log()).squeeze(1), e, total


def _grad_chunk(p: torch.Tensor, tgt: torch.Tensor, scale: torch.Tensor, hm: torch.Tensor, wm: torch.Tensor,
                dh: torch.Tensor, dw: torch.Tensor, first: bool) -> None:
    """One chunk's backward, shared by both modes: ``p`` is its softmax already scaled per row (fp32,
    overwritten), ``G = p - onehot * scale``; writes ``dh = G W`` into ``dh`` (this chunk's rows) and
    adds ``G^T h`` to ``dw`` (the softmax dtype: fp32 accumulation for 16-bit matmuls; the first chunk
    writes instead of adding, so ``dw`` needs no zero fill)."""
    p[torch.arange(p.shape[0], device=p.device), tgt] -= scale
    g = p.to(hm.dtype)
    torch.mm(g, wm, out=dh)
    if g.dtype == dw.dtype:
        if first:
            torch.mm(g.t(), hm, out=dw)
        else:
            dw.addmm_(g.t(), hm)
    elif first:
        dw.copy_(g.t() @ hm)
    else:
        dw += (g.t() @ hm).to(dw.dtype)


def _grad_buffers(h2: torch.Tensor, vocab: int, matmul_dtype: torch.dtype, softmax_dtype: torch.dtype):
    return (torch.empty(h2.shape, device=h2.device, dtype=matmul_dtype),
            torch.empty(vocab, h2.shape[1], device=h2.device, dtype=softmax_dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h2, weight, tgt, scale, chunk_elements, grad_in_forward):
        dt = _matmul_dtype(h2, weight)
        n, vocab = h2.shape[0], weight.shape[0]
        needs = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with _no_autocast(h2.device.type):
            hm, wm = h2.to(dt), weight.to(dt)
            sd = compute_dtype(hm)  # softmax statistics: fp32 (fp64 for fp64 inputs)
            total = torch.zeros((), device=h2.device, dtype=sd)
            lse_all = torch.empty(n, device=h2.device, dtype=sd)
            fwd_grads = needs and grad_in_forward
            if fwd_grads:
                dh, dw = _grad_buffers(h2, vocab, dt, sd)
            starts, rows = _chunks(n, vocab, chunk_elements)
            # one logits buffer for all chunks (and in backward's recomputation below): it stays in cache.
            # Measured fwd+bwd at 1024 x 256, V = 8192, 1 CPU thread: 136 vs 149 ms recomputing the logits,
            # 103 vs 106 ms with the gradients computed here (medians of three processes each)
            buf = torch.empty(min(rows, n), vocab, device=h2.device, dtype=dt)
            for s in starts:
                e = min(s + rows, n)
                logits = torch.mm(hm[s:e], wm.t(), out=buf[: e - s])
                lf = logits.to(sd)  # no copy when the matmul ran in fp32 / fp64
                t, sc = tgt[s:e], scale[s:e]
                picked = lf.gather(1, t[:, None]).squeeze(1)
                lse, ex, rowsum = _lse_(lf)  # lf is exp(logits - max) from here on
                lse_all[s:e] = lse
                total += ((lse - picked) * sc).sum()
                if fwd_grads:
                    _grad_chunk(ex.mul_(sc[:, None] / rowsum), t, sc, hm[s:e], wm, dh[s:e], dw, first=s == 0)
        ctx.dt, ctx.grad_in_forward, ctx.chunk_elements = dt, fwd_grads, chunk_elements
        ctx.h_dtype, ctx.w_dtype = h2.dtype, weight.dtype
        if fwd_grads:
            ctx.save_for_backward(dh, dw)
        elif needs:
            ctx.save_for_backward(h2, weight, tgt, scale, lse_all)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None
        if ctx.grad_in_forward:
            dh, dw = ctx.saved_tensors
            dh = (dh * grad_total.to(dh.dtype)).to(ctx.h_dtype)
            dw = (dw * grad_total).to(ctx.w_dtype)
        else:
            h2, weight, tgt, scale, lse_all = ctx.saved_tensors
            dt, n, vocab = ctx.dt, h2.shape[0], weight.shape[0]
            with _no_autocast(h2.device.type):
                hm, wm = h2.to(dt), weight.to(dt)
                dh, dw = _grad_buffers(h2, vocab, dt, lse_all.dtype)
                scaled = scale * grad_total
                starts, rows = _chunks(n, vocab, ctx.chunk_elements)
                buf = torch.empty(min(rows, n), vocab, device=h2.device, dtype=dt)
                for s in starts:
                    e = min(s + rows, n)
                    lf = torch.mm(hm[s:e], wm.t(), out=buf[: e - s]).to(lse_all.dtype)
                    sc = scaled[s:e]
                    p = lf.sub_(lse_all[s:e, None]).exp_().mul_(sc[:, None])
                    _grad_chunk(p, tgt[s:e], sc, hm[s:e], wm, dh[s:e], dw, first=s == 0)
            dh, dw = dh.to(ctx.h_dtype), dw.to(ctx.w_dtype)
        return (dh if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), \
            None, None, None, None


def linear_cross_entropy_chunk(h, weight, targets, mask, grad_in_forward: bool = False,
                               chunk_elements: int | None = None):
    """Same contract as :func:`linear_cross_entropy_naive` (fp32 scalar ``sum mask * CE``); see the
    module docstring for ``grad_in_forward`` (ignored when no gradient is recorded)."""
    _check(h, weight, targets, mask)
    if chunk_elements is None:
        chunk_elements = DEFAULT_CHUNK_ELEMENTS.get(h.device.type, DEFAULT_CHUNK_ELEMENTS["cpu"])
    if chunk_elements < 1:
        raise ValueError(f"linear_cross_entropy: chunk_elements must be >= 1, got {chunk_elements}")
    h2 = h.reshape(-1, h.shape[-1])
    scale = mask.reshape(-1).to(compute_dtype(h, weight))
    return _LinearCrossEntropy.apply(h2, weight, targets.reshape(-1), scale, int(chunk_elements),
                                     bool(grad_in_forward) and torch.is_grad_enabled())
