"""The adapter contract (torchtitan's state-dict-adapter idea) and the registry that picks one.

An adapter converts one foreign family's ``config.json`` + tensors to a megasleep ``ModelConfig`` +
HybridLM state dict, with a record of which source tensor went where (the key/shape map); adapters
that can also export implement :meth:`Adapter.export`. Every source tensor must be consumed exactly once:
a leftover tensor is an error, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from megasleep.checkpoint.errors import PretrainedError, UnsupportedModelError, WeightsMismatchError
from megasleep.checkpoint.released import compare_state_dict
from megasleep.checkpoint.weights import WEIGHTS_INDEX_NAME, read_json, weights_files
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


def source_file(directory: str, tensor: str) -> str:
    """The weights file in ``directory`` that holds ``tensor`` (through a sharded index when there is one)."""
    index = Path(directory) / WEIGHTS_INDEX_NAME
    if index.is_file():
        return str((read_json(index).get("weight_map") or {}).get(tensor, WEIGHTS_INDEX_NAME))
    try:
        return ", ".join(f.name for f in weights_files(directory)[1])
    except PretrainedError:  # not a directory (a state dict handed over in memory)
        return "<weights>"


def check_shapes(cfg: ModelConfig, out: State, used: dict[str, list[str]], where: str) -> None:
    """Refuse a converted tensor whose shape is not the one ``cfg`` gives it, naming the source tensor and
    its file (a mis-shaped tensor in a foreign checkpoint, or a config.json that does not fit the weights)."""
    origin = {dst: src for src, dsts in used.items() for dst in dsts}
    _, _, mismatched = compare_state_dict(cfg, out)
    if mismatched:
        dst, got, want = mismatched[0]
        src = origin.get(dst, dst)
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise WeightsMismatchError(f"{where}/{source_file(where, src)}: tensor {src} has shape {got}, config.json "
                                   f"implies {want} (as {dst}){more}", mismatched=mismatched)


__all__ = ["Adapter", "State", "TensorMap", "check_shapes", "refuse", "source_file"]
