"""HybridLM: Embed -> prelude -> [core] x N -> coda -> norm -> LM head (docs/sleep.md#mixers).

The model itself only knows how to run a list of blocks over some tokens given per-layer caches; how
often the core runs and what is evicted when is the sleep loop's business (megasleep/sleep/loop.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from megasleep.models.block import Block
from megasleep.models.cache import LayerCache, MixContext, doc_resets
from megasleep.models.config import ModelConfig
from megasleep.ops.linear_ce import linear_cross_entropy_chunk

Caches = list[LayerCache]


class LMHead(nn.Linear):
    """The LM head: logits, or, given targets, the masked cross-entropy sum straight from the features
    (``linear_cross_entropy_chunk``: the ``[B, L, V]`` logits never exist in full). Both run inside
    this module's ``forward`` so that ZeRO-3's gather hooks see the weight used."""

    def forward(self, x: Tensor, targets: Tensor | None = None, mask: Tensor | None = None,
                grad_in_forward: bool = False) -> Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy_chunk(x, self.weight, targets, mask, grad_in_forward=grad_in_forward)


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, c, i) for i, c in enumerate(cfg.pattern))
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, bias=False)
        pre, core, coda = cfg.split()
        self.prelude_idx, self.core_idx, self.coda_idx = list(pre), list(core), list(coda)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # ---- structure -------------------------------------------------------------------------------
    @property
    def prelude(self) -> list[Block]:
        return [self.layers[i] for i in self.prelude_idx]

    @property
    def core(self) -> list[Block]:
        return [self.layers[i] for i in self.core_idx]

    @property
    def coda(self) -> list[Block]:
        return [self.layers[i] for i in self.coda_idx]

    def init_plan(self) -> list[tuple[nn.Module, float]]:
        """(module, std) in draw order: every Linear (residual outputs scaled by 1/sqrt(2 D)), then the
        embedding. Shared by reset_parameters and the trainer's ZeRO-3 re-init (same weights)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * len(self.layers))
        plan = [(mod, out_std if name.rsplit(".", 1)[-1] in ("o_proj", "out_proj", "down_proj") else std)
                for name, mod in self.named_modules() if isinstance(mod, nn.Linear)]
        return [*plan, (self.embed_tokens, std)]

    @staticmethod
    def init_module(mod: nn.Module, std: float) -> None:
        nn.init.normal_(mod.weight, std=std)
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.zeros_(mod.bias)

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for projections and embeddings; residual outputs scaled by 1/sqrt(2 D)."""
        if self.embed_tokens.weight.device.type == "meta":
            return
        for mod, std in self.init_plan():
            self.init_module(mod, std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, total = set(), 0
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen or (exclude_embeddings and "embed_tokens" in name):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    # ---- running blocks --------------------------------------------------------------------------
    def check_ids(self, input_ids: Tensor) -> None:
        vocab = self.config.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token ids must be in [0, {vocab}) for this model "
                             f"(got min {int(input_ids.min())}, max {int(input_ids.max())})")

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def head(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm_f(h))

    def head_loss(self, h: Tensor, targets: Tensor, mask: Tensor, grad_in_forward: bool = False) -> Tensor:
        """``sum mask * CE(head(h), targets)`` (fp32 scalar) without materialising the logits; with
        ``grad_in_forward`` the head's gradients are computed in the forward (see LMHead)."""
        return self.lm_head(self.norm_f(h), targets, mask, grad_in_forward)

    def init_caches(self, batch: int, device=None, dtype=None) -> Caches:
        return [blk.init_cache(batch, device, dtype) for blk in self.layers]

    def run_blocks(self, idx: Sequence[int], h: Tensor, caches: Caches, ctx: MixContext) -> tuple[Tensor, Caches]:
        """Run the blocks ``idx`` in order; returns new features and a new cache list (inputs untouched)."""
        caches = list(caches)
        for i in idx:
            h, caches[i] = self.layers[i](h, caches[i], ctx)
        return h, caches

    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        """Logits of every position with the whole sequence as one window and N = 1 (what the sleep loop
        computes in that case). Windows, passes and eviction are megasleep.sleep's business."""
        self.check_ids(input_ids)
        B, T = input_ids.shape
        ctx = MixContext.for_span(0, T, max(1, T), doc_ids=doc_ids, reset=doc_resets(doc_ids),
                                  backend=self.config.kernels, device=input_ids.device)
        caches = self.init_caches(B, input_ids.device, self.embed_tokens.weight.dtype)
        h, _ = self.run_blocks(range(len(self.layers)), self.embed(input_ids), caches, ctx)
        return self.head(h)


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> HybridLM:
    with torch.device(device or "cpu"):
        return HybridLM(cfg)
