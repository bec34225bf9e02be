"""Optimizers and learning-rate schedules.

* ``adamw``: ``torch.optim.AdamW`` with two groups: decayed (matrices, embeddings) and not decayed
  (1-D weights, biases, and every parameter tagged ``_no_weight_decay`` such as ``A_log``,
  ``dt_bias``, ``D``).
* ``muon``: the paper's recipe — Muon on the hidden weight matrices (2-D weights inside the blocks;
  not the embedding / tied LM head, not the short-conv kernels), AdamW on everything else. We use
  DeepSpeed's ``MuonWithAuxAdam`` as the client optimizer (``use_muon`` groups): it is the Muon
  that ZeRO 1/2/3 know how to run (they orthogonalise the *full* gradient of each matrix before
  partitioning the update). ``torch.optim.Muon`` (torch >= 2.9) is the same update for single-device
  use, but cannot see whole matrices once ZeRO has flattened and partitioned them.

The learning rate is a pure function of the step (:func:`lr_multiplier`): the trainer writes
``base_lr * multiplier(step)`` into every group before each optimizer step, so a resumed run and a
run with skipped (non-finite) steps follow the same schedule, and no scheduler state is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from megasleep.train.config import OptimConfig


def lr_multiplier(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``."""
    w = cfg.warmup_steps
    if w and step < w:
        return (step + 1) / w
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total - w)
        progress = min(1.0, (step - w) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # wsd: warmup, stable at the peak, then linear decay over the last decay_fraction of the run
    decay = max(1, round(cfg.decay_fraction * total))
    start = total - decay
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay)
    return 1.0 - (1.0 - floor) * progress


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or getattr(p, "_no_weight_decay", False) or name.endswith(".bias")


def is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """Muon's parameters: 2-D weights inside the blocks (embeddings / LM head / convs / vectors excluded)."""
    if p.ndim != 2 or "embed" in name or "lm_head" in name or getattr(p, "_no_weight_decay", False):
        return False
    return name.startswith("layers.") or ".layers." in name


def _named_unique(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            yield name, p


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Parameter groups, each with its ``base_lr`` (what the schedule multiplies)."""
    named = list(_named_unique(model))
    groups: list[dict] = []
    if cfg.name == "muon":
        muon = [p for n, p in named if is_hidden_matrix(n, p)]
        muon_ids = {id(p) for p in muon}
        rest = [(n, p) for n, p in named if id(p) not in muon_ids]
        for p in model.parameters():
            p.use_muon = id(p) in muon_ids  # what DeepSpeed's ZeRO optimizers look for
        mwd = cfg.weight_decay if cfg.muon_weight_decay is None else cfg.muon_weight_decay
        groups.append(dict(params=muon, use_muon=True, lr=cfg.muon_lr, base_lr=cfg.muon_lr,
                           momentum=cfg.muon_momentum, weight_decay=mwd, ns_method="standard",
                           name="muon"))
        named = rest
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    for ps, wd, label in ((decay, cfg.weight_decay, "decay"), (no_decay, 0.0, "no_decay")):
        if not ps:
            continue
        g = dict(params=ps, lr=cfg.lr, base_lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=wd,
                 name=f"adamw_{label}")
        if cfg.name == "muon":
            g["use_muon"] = False
        groups.append(g)
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    from megasleep.models.precision import split_groups_by_dtype

    groups = split_groups_by_dtype(param_groups(model, cfg))  # bf16 weights: ZeRO wants one dtype per group
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW,
                           adam_optimizer_kwargs=dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps))


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> list[float]:
    lrs = []
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", g["lr"]) * multiplier
        lrs.append(g["lr"])
    return lrs


def guard_nonfinite(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Without ZeRO, DeepSpeed steps a plain fp32 optimizer even when a gradient is inf/NaN. Give the
    optimizer the ``overflow`` flag that DeepSpeed's ZeRO optimizers have (the engine reads it and
    counts a skipped step): a step whose gradients are not all finite changes nothing."""
    base = type(optimizer)

    def step(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        finite = bool(torch.stack([torch.isfinite(gr).all() for gr in grads]).all()) if grads else True
        self.overflow = not finite
        if not finite:
            return None
        return base.step(self, *args, **kwargs)

    optimizer.__class__ = type(f"Guarded{base.__name__}", (base,), {"step": step})
    optimizer.overflow = False
    return optimizer
