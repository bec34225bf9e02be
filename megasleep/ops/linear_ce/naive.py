"""Reference: the LM head's logits materialised in full, then masked cross-entropy summed."""

from __future__ import annotations

import torch.nn.functional as F

from .._common import compute_dtype


def _check(h, weight, targets, mask):
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight must be [V, d] with d = h.shape[-1] = {h.shape[-1]}, "
                         f"got {list(weight.shape)}")
    if targets.shape != h.shape[:-1] or mask.shape != targets.shape:
        raise ValueError(f"linear_cross_entropy: targets and mask must have shape {list(h.shape[:-1])} "
                         f"(h without its last dim), got {list(targets.shape)} and {list(mask.shape)}")


def linear_cross_entropy_naive(h, weight, targets, mask):
    """``sum_t mask_t * CE(h_t @ weight^T, targets_t)`` (fp32 scalar, fp64 for fp64 inputs); logits in the
    matmul dtype that ``F.linear`` gives (autocast applies), upcast to fp32 for the softmax."""
    _check(h, weight, targets, mask)
    logits = F.linear(h, weight)
    ce = F.cross_entropy(logits.to(compute_dtype(logits)).flatten(0, -2), targets.flatten(), reduction="none")
    return (ce * mask.flatten().to(ce.dtype)).sum()
