"""Which attention kernel runs, decided from host-side facts only (shapes, flags), never from values.

* plain causal (no cached keys, no document ids, the call fits in one window): ``is_causal=True``
  and no mask, so SDPA can take its fused kernels (flash / memory-efficient / cuDNN on CUDA, the
  flash kernel on CPU) instead of the math kernel that materialises the scores;
* banded (sliding window over cached keys) or document-masked calls: FlexAttention with a block
  mask on CUDA (compiled once, fused, skips fully masked blocks); elsewhere, or for short queries
  (decoding), SDPA with the explicit boolean mask, :func:`masked_reference`, which is also what
  the fast paths are tested against.

Grouped-query heads: SDPA's ``enable_gqa`` is honoured by the flash kernels (16-bit inputs); for
fp32 on CUDA the keys/values are expanded instead, so the memory-efficient kernel can take it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

# below this many queries the explicit mask is small and a compiled FlexAttention is not worth it
FLEX_MIN_QUERIES = 128


def band_mask(q_pos: Tensor, k_pos: Tensor, window: int, q_doc: Tensor | None, k_doc: Tensor | None) -> Tensor:
    """[B or 1, 1, Tq, Tk] bool: a query sees keys at most window-1 positions back, never ahead,
    and only in its own document."""
    dist = q_pos[:, None] - k_pos[None, :]
    mask = ((dist >= 0) & (dist < window))[None, None]
    if q_doc is not None:
        mask = mask & q_doc[:, None, :, None].eq(k_doc[:, None, None, :])
    return mask


def _expand_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    rep = q.shape[1] // k.shape[1]
    return k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
         scale: float | None = None) -> Tensor:
    """SDPA with grouped-query heads routed to a kernel that accepts them (see the module doc)."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda and q.dtype == torch.float32:
        k, v = _expand_kv(q, k, v)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)


def masked_reference(q, k, v, q_pos, k_pos, window, q_doc=None, k_doc=None, scale=None) -> Tensor:
    """The obviously-correct banded / document-masked attention (explicit boolean mask)."""
    return sdpa(q, k, v, band_mask(q_pos, k_pos, window, q_doc, k_doc), scale=scale)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_masked(q, k, v, q_pos, k_pos, window, q_doc=None, k_doc=None, compiled: bool | None = None,
                scale: float | None = None) -> Tensor:
    """Banded / document-masked attention through FlexAttention's block mask (same result as
    :func:`masked_reference`). ``compiled`` defaults to "on CUDA"; eager FlexAttention (CPU tests)
    is exact but unfused."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, qi, ki):
        dist = q_pos[qi] - k_pos[ki]
        keep = (dist >= 0) & (dist < window)
        if q_doc is not None:
            keep = keep & (q_doc[b, qi] == k_doc[b, ki])
        return keep

    B, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    block = create_block_mask(mask_mod, B if q_doc is not None else None, None, tq, tk, device=q.device)
    compiled = q.is_cuda if compiled is None else compiled
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k, v, block_mask=block, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, window: int,
           q_doc: Tensor | None, k_doc: Tensor | None, plain_causal: bool, scale: float | None = None) -> Tensor:
    """q [B, H, Tq, Dh], k/v [B, Hkv, Tk, Dh] -> [B, H, Tq, Dh]; the dispatch of the module doc."""
    if plain_causal:
        return sdpa(q, k, v, is_causal=True, scale=scale)
    if q.is_cuda and q.shape[2] >= FLEX_MIN_QUERIES:
        return flex_masked(q, k, v, q_pos, k_pos, window, q_doc, k_doc, scale=scale)
    return masked_reference(q, k, v, q_pos, k_pos, window, q_doc, k_doc, scale=scale)
