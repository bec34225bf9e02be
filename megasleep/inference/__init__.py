"""Streaming wake/sleep inference (docs/inference.md): :class:`Session` (prefill / step, sleep when
a window fills, memory bounded by one window), :func:`generate` / :func:`generate_stream`, and the
``megasleep generate`` command (:mod:`megasleep.inference.cli`)."""

from megasleep.inference.generate import (
                                          GenerateResult,
                                          GenerationStats,
                                          TokenEvent,
                                          TokenStream,
                                          generate,
                                          generate_stream,
)
from megasleep.inference.sampling import filter_logits, sample_next
from megasleep.inference.session import Session, SleepRecord, make_sleep_config

__all__ = ["GenerateResult", "GenerationStats", "Session", "SleepRecord", "TokenEvent", "TokenStream",
           "filter_logits", "generate", "generate_stream", "make_sleep_config", "sample_next"]
