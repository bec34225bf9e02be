"""Next-token choice: greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no limit), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """``logits [..., V]`` with everything outside the top-k / top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p`` (always at
    least the most likely token)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs            # mass of the strictly more likely tokens
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> int:
    """One token id from one row of logits ``[V]``."""
    if temperature == 0:
        return int(logits.argmax(-1))
    lg = filter_logits(logits, top_k, top_p) / temperature
    probs = lg.double().softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
