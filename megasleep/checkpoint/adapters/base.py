"""The adapter contract (torchtitan's state-dict-adapter idea) and the registry that picks one.

An adapter converts one foreign family's ``config.json`` + tensors to a megasleep ``ModelConfig`` +
HybridLM state dict, with a record of which source tensor went where (the key/shape map); adapters
that can also export implement :meth:`Adapter.export`. Every source tensor must be consumed exactly once:
a leftover tensor is an error, never silently dropped.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from megasleep.checkpoint.errors import UnsupportedModelError
from megasleep.models.config import ModelConfig

State = dict[str, torch.Tensor]


class Adapter:
    """One foreign family. Subclasses set ``name`` / ``model_types`` and implement ``convert``."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    can_export: ClassVar[bool] = False

    @classmethod
    def matches(cls, raw: dict) -> bool:
        return raw.get("model_type") in cls.model_types

    def convert(self, raw: dict, state: State, where: str, overrides: dict) -> tuple[ModelConfig, State, dict]:
        """(ModelConfig, HybridLM state dict, report with at least ``mapped`` {source: [targets]})."""
        raise NotImplementedError

    def export(self, cfg: ModelConfig, state: State, where: str) -> tuple[dict, State]:
        """(foreign config.json dict, foreign state dict) of a megasleep model (when ``can_export``)."""
        raise UnsupportedModelError(f"{where}: the {self.name} adapter cannot export")


class TensorMap:
    """Takes source tensors by name and records where each went; ``finish`` refuses leftovers."""

    def __init__(self, state: State, where: str):
        self.state, self.where = state, where
        self.out: State = {}
        self.used: dict[str, list[str]] = {}

    def take(self, src: str) -> torch.Tensor:
        if src not in self.state:
            raise UnsupportedModelError(f"{self.where}: tensor {src} is missing")
        self.used.setdefault(src, [])
        return self.state[src]

    def has(self, src: str) -> bool:
        return src in self.state

    def put(self, dst: str, t: torch.Tensor, src: str) -> None:
        self.used.setdefault(src, []).append(dst)
        self.out[dst] = t

    def move(self, src: str, dst: str) -> None:
        self.put(dst, self.take(src), src)

    def note(self, src: str, what: str) -> None:
        """Consume ``src`` without producing a tensor (e.g. a tied head), saying why."""
        self.take(src)
        self.used[src].append(what)

    def finish(self) -> tuple[State, dict[str, list[str]]]:
        left = sorted(set(self.state) - set(self.used))
        if left:
            raise UnsupportedModelError(f"{self.where}: {len(left)} tensor(s) have no megasleep counterpart: "
                                        f"{left[:12]}")
        return self.out, self.used


def refuse(where: str, msg: str):
    raise UnsupportedModelError(f"{where}: cannot import faithfully: {msg}")


__all__ = ["Adapter", "State", "TensorMap", "refuse"]
