"""Pre-norm block: x + Mixer(RMSNorm(x)), then x + MLP(RMSNorm(x)) (the MLP is optional; models/mlp.py).

A block whose letter is in ``post_norm`` normalises the branch outputs instead (OLMo-2/3 and OLMo-Hybrid's
attention layers): x + RMSNorm(Mixer(x)), then x + RMSNorm(MLP(x)). Same parameters, same names.
"""

from __future__ import annotations

from torch import Tensor, nn

from megasleep.models.attention import Attention
from megasleep.models.cache import LayerCache, MixContext
from megasleep.models.config import MIXER_LETTERS, ModelConfig
from megasleep.models.gdn import GatedDeltaNet
from megasleep.models.mamba2 import Mamba2
from megasleep.models.mlp import build_mlp

MIXERS = {"attn": Attention, "mamba2": Mamba2, "gdn": GatedDeltaNet}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, letter: str, index: int):
        super().__init__()
        self.letter, self.index, self.kind = letter, index, MIXER_LETTERS[letter]
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXERS[self.kind](cfg)
        self.mlp = build_mlp(cfg, letter, index)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) if self.mlp is not None else None
        self.post_norm = letter in cfg.post_norm

    @property
    def is_ssm(self) -> bool:
        return self.kind != "attn"

    def init_cache(self, batch: int, device=None, dtype=None) -> LayerCache:
        return self.mixer.init_cache(batch, device, dtype)

    def forward(self, h: Tensor, cache: LayerCache, ctx: MixContext) -> tuple[Tensor, LayerCache]:
        if self.post_norm:
            y, cache = self.mixer(h, cache, ctx)
            h = h + self.norm(y)
            if self.mlp is not None:
                h = h + self.mlp_norm(self.mlp(h))
            return h, cache
        y, cache = self.mixer(self.norm(h), cache, ctx)
        h = h + y
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h, cache
