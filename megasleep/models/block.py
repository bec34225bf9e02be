"""Pre-norm block: x + Mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)) (the MLP is optional)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megasleep.models.attention import Attention
from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.config import MIXER_LETTERS, ModelConfig
from megasleep.models.gdn import GatedDeltaNet
from megasleep.models.mamba2 import Mamba2

MIXERS = {"attn": Attention, "mamba2": Mamba2, "gdn": GatedDeltaNet}


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mlp_hidden(cfg: ModelConfig, letter: str) -> int:
    ratio = getattr(cfg.mlp, letter)
    if ratio == 0:
        return 0
    m = cfg.mlp.multiple_of
    return max(m, int(round(ratio * cfg.d_model / m)) * m)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, letter: str, index: int):
        super().__init__()
        self.letter, self.index, self.kind = letter, index, MIXER_LETTERS[letter]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXERS[self.kind](cfg)
        hidden = mlp_hidden(cfg, letter)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if hidden else None
        self.mlp = SwiGLU(cfg.d_model, hidden) if hidden else None

    @property
    def is_ssm(self) -> bool:
        return self.kind != "attn"

    def init_cache(self, batch: int, device=None, dtype=None) -> LayerCache:
        return self.mixer.init_cache(batch, device, dtype)

    def forward(self, h: Tensor, cache: LayerCache, ctx: MixContext) -> tuple[Tensor, LayerCache]:
        y, cache = self.mixer(self.norm(h), cache, ctx)
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h, cache
