"""LM head fused with masked cross-entropy: ``linear_cross_entropy_naive`` (full logits, the
reference) and ``linear_cross_entropy_chunk`` (row chunks; the logits never exist in full)."""

from .chunk import DEFAULT_CHUNK_ELEMENTS, linear_cross_entropy_chunk
from .naive import linear_cross_entropy_naive

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "linear_cross_entropy_chunk", "linear_cross_entropy_naive"]
