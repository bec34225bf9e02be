"""Sleep settings (docs/sleep.md): window L, passes N, eviction, and the switches beyond the paper.

Every switch defaults to the paper's method; the remedies against feature collapse across sleep passes
(``feedback_norm``, ``reinject``, ``truncate_mode="straight_through"``) are opt-in.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from megasleep.config import StrictModel


class SleepConfig(StrictModel):
    window: int = Field(ge=1, description="L: tokens per window (attention KV bound)")
    passes: int = Field(1, ge=1, description="N: passes over each window before eviction (1 = no sleep)")
    eviction: Literal["hard", "sliding"] = "hard"
    random_passes: tuple[int, int] | None = Field(
        None, description="[lo, hi]: sample N uniformly per step from a generator seeded by the step")
    random_seed: int = 0
    truncate_backprop: int | None = Field(
        None, ge=0, description="only the last k sleep passes of each window carry gradient")
    truncate_mode: Literal["detach", "straight_through"] = Field(
        "detach", description="what a truncated pass does to the gradient: 'detach' cuts h and S (no "
                              "gradient reaches the wake pass or the window's tokens); 'straight_through' "
                              "adds the pass's change as a constant, so gradient flows on as through identity")
    feedback_norm: bool = Field(
        False, description="before each sleep pass rescale every position's fed-back features to the RMS "
                           "of that position's wake-pass core input (parameter-free)")
    reinject: bool = Field(
        False, description="before each sleep pass add the window's core input (Embed, or the prelude's "
                           "output) to the fed-back features, as Huginn re-injects its input")
    adaptive_tol: float | None = Field(
        None, gt=0, description="inference: stop sleeping once every state's relative change < tol")
    checkpoint: bool = Field(True, description="activation checkpointing per (window, pass) when training")

    @model_validator(mode="after")
    def _check(self) -> SleepConfig:
        if self.random_passes is not None:
            lo, hi = self.random_passes
            if not 1 <= lo <= hi:
                raise ValueError(f"random_passes={list(self.random_passes)}: need 1 <= lo <= hi")
        return self

    def passes_for_step(self, step: int | None) -> int:
        """N for this step. Random N is drawn from a generator seeded by (seed, step) alone, so every
        rank draws the same N and a resumed run replays the same sequence (Huginn's habit)."""
        if self.random_passes is None or step is None:
            return self.passes
        lo, hi = self.random_passes
        gen = torch.Generator().manual_seed(self.random_seed * 1_000_003 + int(step))
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))
