"""What every task generator provides, and the seeding rules shared by all of them.

A task module defines:

* ``NAME`` and ``VERSION`` (bump ``VERSION`` whenever the same seed would give different samples;
  manifests record it),
* ``DEFAULTS``: its parameters (``make_sample`` keyword arguments) with default values,
* ``DIFFICULTY``: what the integer difficulty means (``"t"``, ``"k"``, ``"ops"``),
* ``SYMBOLS`` (or a function building them) and ``make_task_tokenizer(out_dir, **params)``,
* ``make_sample(rng, difficulty, tokenizer, **params) -> sample dict`` (see
  :mod:`megasleep.data.sample`), deterministic given the generator state ``rng``.

Seeds: sample ``i`` of split ``s`` of a dataset with base seed ``seed`` is generated from
``numpy.random.default_rng(SeedSequence([seed, split_id(s), i]))`` — independent of shard size,
worker count and order, and disjoint across splits.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def split_id(split: str) -> int:
    """0/1/2 for train/val/test; any other split name gets a stable id >= 1000 (crc32 of the name)."""
    if split in SPLIT_IDS:
        return SPLIT_IDS[split]
    return 1000 + zlib.crc32(split.encode("utf-8"))


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), split_id(split), int(index)]))


def parse_difficulty(spec) -> list[int]:
    """``"1-16"`` -> [1..16]; ``"1,2,4"`` -> [1,2,4]; ``8`` -> [8]; a list stays a list."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)):
        return [int(x) for x in spec]
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(f"difficulty range {part!r} is empty")
            out.extend(range(lo_i, hi_i + 1))
        else:
            out.append(int(part))
    if not out:
        raise ValueError(f"difficulty spec {spec!r} is empty")
    return out


@dataclass
class TaskSpec:
    """Registry entry: a task module's public surface."""

    name: str
    version: str
    module: ModuleType
    defaults: dict = field(default_factory=dict)
    difficulty_name: str = "difficulty"

    @property
    def make_sample(self) -> Callable:
        return self.module.make_sample

    @property
    def make_task_tokenizer(self) -> Callable:
        return self.module.make_task_tokenizer

    @property
    def generator(self) -> str:
        return self.module.__name__

    def params(self, **overrides) -> dict:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise ValueError(f"task {self.name}: unknown parameters {sorted(unknown)} (known: {sorted(self.defaults)})")
        return {**self.defaults, **overrides}

    def sample(self, seed: int, split: str, index: int, difficulties, tokenizer, **params) -> dict:
        """Sample ``index`` of ``split``: draws its difficulty from ``difficulties`` (uniformly),
        then calls ``make_sample``; the key and provenance go into ``meta``."""
        rng = sample_rng(seed, split, index)
        diffs = parse_difficulty(difficulties)
        d = diffs[int(rng.integers(len(diffs)))] if len(diffs) > 1 else diffs[0]
        s = self.make_sample(rng, d, tokenizer, **self.params(**params))
        s["meta"].update(split=split, index=int(index), seed=int(seed), version=self.version)
        return s
