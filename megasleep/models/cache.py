"""Per-layer recurrent caches and the per-call context every mixer receives.

A layer's cache has two kinds of memory, and the sleep loop treats them differently (docs/sleep.md):
* long-term: ``ssm`` — an SSM mixer's fast weights ``S``. Carried from pass to pass and from window to
  window; the only thing that survives hard eviction.
* short-term: the short-conv history (``conv``) and attention's KV cache (``k, v, pos, doc``). Every pass
  over a window starts from the short-term memory the window started with; eviction empties it (hard)
  or keeps the last ``L-1`` positions of the wake pass (sliding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class LayerCache:
    ssm: Tensor | None = None                 # [B, H, ., .] fast weights (fp32)
    conv: tuple[Tensor, ...] | None = None    # short-conv states, each [B, D, W-1]
    k: Tensor | None = None                   # [B, Hkv, S, Dh] post-RoPE keys
    v: Tensor | None = None                   # [B, Hkv, S, Dh]
    pos: Tensor | None = None                 # [S] absolute positions of the cached keys
    doc: Tensor | None = None                 # [B, S] document ids of the cached keys

    def short_term(self) -> LayerCache:
        """The part every sleep pass restarts from (conv history + KV), without the fast weights."""
        return replace(self, ssm=None)

    def with_short_term(self, other: LayerCache) -> LayerCache:
        return replace(other, ssm=self.ssm)

    def evict(self, mode: str, window: int) -> LayerCache:
        if mode == "hard":
            return LayerCache(ssm=self.ssm)
        if self.k is not None and self.k.shape[2] > window - 1:
            keep = max(window - 1, 0)
            start = self.k.shape[2] - keep
            return replace(self, k=self.k[:, :, start:], v=self.v[:, :, start:], pos=self.pos[start:],
                           doc=None if self.doc is None else self.doc[:, start:])
        return self


@dataclass
class MixContext:
    """What a mixer needs to know about the tokens of one call besides their features."""

    positions: Tensor                 # [T] absolute positions (RoPE angle and sliding-window mask)
    window: int                       # L
    eviction: str = "hard"            # "hard" | "sliding"
    doc_ids: Tensor | None = None     # [B, T] document id per token (attention mask)
    reset: Tensor | None = None       # [B, T] bool: SSM/conv state cleared before this token
    backend: str = "auto"             # kernel backend: auto | torch | cuda
    span: tuple[int, int] | None = None  # (start, end) when positions == arange(start, end): host-side
                                         # facts (RoPE table slice, plain-causal test) without a sync

    @staticmethod
    def for_span(start: int, end: int, window: int, eviction: str = "hard", doc_ids: Tensor | None = None,
                 reset: Tensor | None = None, backend: str = "auto", device=None) -> MixContext:
        return MixContext(torch.arange(start, end, device=device), window, eviction,
                          doc_ids, reset, backend, (start, end))


def doc_resets(doc_ids: Tensor | None) -> Tensor | None:
    """[B, T] bool, True where a new document starts (never at position 0: state starts at zero)."""
    if doc_ids is None:
        return None
    reset = torch.zeros_like(doc_ids, dtype=torch.bool)
    reset[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return reset if bool(reset.any()) else None
