"""The MLP after a block's mixer: SwiGLU (megasleep's default, Llama's) or a non-gated ReLU² MLP
(Nemotron-H). Which blocks have one: ``mlp.<letter>`` > 0, or per block with ``mlp.blocks``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megasleep.models.config import ModelConfig


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReLU2MLP(nn.Module):
    """down(relu(up(x))²), no gate (Nemotron-H's MLP layers)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


MLPS = {"swiglu": SwiGLU, "relu2": ReLU2MLP}


def mlp_hidden(cfg: ModelConfig, letter: str, index: int | None = None) -> int:
    """Hidden width of block ``index``'s MLP (0: none); without ``index``, of a block of that letter."""
    if index is not None and cfg.mlp.blocks is not None and cfg.mlp.blocks[index] == "0":
        return 0
    ratio = getattr(cfg.mlp, letter)
    if ratio == 0:
        return 0
    m = cfg.mlp.multiple_of
    return max(m, int(round(ratio * cfg.d_model / m)) * m)


def build_mlp(cfg: ModelConfig, letter: str, index: int) -> nn.Module | None:
    hidden = mlp_hidden(cfg, letter, index)
    return MLPS[cfg.mlp.activation](cfg.d_model, hidden) if hidden else None


__all__ = ["MLPS", "ReLU2MLP", "SwiGLU", "build_mlp", "mlp_hidden"]
