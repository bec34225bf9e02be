"""Rotary position embedding with cached cos/sin tables.

The angle of position ``p`` and frequency ``i`` is ``p * theta^(-i/half)``; the tables hold it for
positions ``0..n-1`` and grow (to the next power of two) when a call reaches further, so a training
step builds them once instead of once per layer, pass and window. Values equal the uncached
formula exactly: the table rows are computed with the same elementwise operations.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_dtype(x: Tensor) -> torch.dtype:
    """fp64 stays fp64 (tight reference tests); everything else rotates in fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def inv_frequencies(half: int, theta: float, device, dtype) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, half, device=device, dtype=dtype) / half))


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Half-split rotation (as in Llama / FLA) of x [..., T, Dh] by cos/sin [T, Dh/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].to(cos.dtype), x[..., half:].to(cos.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def partial(x: Tensor, rotary_dim: int | None, fn) -> Tensor:
    """Apply the rotation ``fn`` to the first ``rotary_dim`` dims of x only (partial rotary, as in
    NeoX-style and hybrid checkpoints); ``rotary_dim`` 0 means no positions at all, None all dims."""
    if rotary_dim is None or rotary_dim >= x.shape[-1]:
        return fn(x)
    if rotary_dim == 0:
        return x
    return torch.cat([fn(x[..., :rotary_dim]), x[..., rotary_dim:]], dim=-1)


def rope(x: Tensor, positions: Tensor, theta: float, rotary_dim: int | None = None) -> Tensor:
    """x [B, H, T, Dh] rotated by ``positions`` [T] (uncached reference)."""
    if rotary_dim is not None and rotary_dim < x.shape[-1]:
        return partial(x, rotary_dim, lambda y: rope(y, positions, theta))
    dtype = rope_dtype(x)
    ang = positions.to(dtype)[:, None] * inv_frequencies(x.shape[-1] // 2, theta, x.device, dtype)[None, :]
    return rotate(x, ang.cos(), ang.sin())


class RopeCache:
    """cos/sin tables per (device, dtype), not module state: never saved, never moved by ``.to()``."""

    def __init__(self, head_dim: int, theta: float, rotary_dim: int | None = None):
        self.rotary_dim = rotary_dim if rotary_dim is not None and rotary_dim < head_dim else None
        self.half, self.theta = (self.rotary_dim if self.rotary_dim is not None else head_dim) // 2, theta
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}

    def tables(self, end: int, device, dtype) -> tuple[Tensor, Tensor]:
        """Tables covering positions ``[0, end)`` (possibly longer)."""
        key = (torch.device(device), dtype)
        cos_sin = self._tables.get(key)
        if cos_sin is None or cos_sin[0].shape[0] < end:
            n = 1 << max(end - 1, 1).bit_length()
            ang = torch.arange(n, device=device).to(dtype)[:, None] * inv_frequencies(
                self.half, self.theta, device, dtype)[None, :]
            cos_sin = self._tables[key] = (ang.cos(), ang.sin())
        return cos_sin

    def __call__(self, x: Tensor, positions: Tensor, span: tuple[int, int] | None) -> Tensor:
        """Rotate x [B, H, T, Dh]. ``span`` = (start, end) when the positions are ``arange(start, end)``
        (known on the host: slicing the table needs no device sync); otherwise the uncached formula."""
        if span is None:
            return rope(x, positions, self.theta, self.rotary_dim)
        start, end = span
        cos, sin = self.tables(end, x.device, rope_dtype(x))
        return partial(x, self.rotary_dim, lambda y: rotate(y, cos[start:end], sin[start:end]))
