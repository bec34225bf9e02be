"""Tiny random transformers models built from config (no download) for the adapter parity tests."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

# transformers binds a family's conv / scan functions when its modeling module is imported: to mamba_ssm's
# and causal_conv1d's when those import. Import them now, at collection, before any test registers
# megasleep's CPU stand-ins for the CUDA extensions (tests/checkpoint/test_mamba_ssm.py does), so every
# reference is transformers' own torch path.
for _family in ("mamba2", "bamba", "granitemoehybrid", "nemotron_h", "olmo_hybrid"):
    try:
        importlib.import_module(f"transformers.models.{_family}.modeling_{_family}")
    except ImportError:  # transformers absent or without that family: its tests skip
        pass


def transformers_or_skip():
    return pytest.importorskip("transformers", reason="transformers is not installed")


def build_hf(model_type: str, out: Path, seed: int = 0, **kw):
    """AutoConfig.for_model + AutoModelForCausalLM.from_config, every weight moved off its init value
    (so a swapped mapping cannot hide behind ones / zeros), saved with save_pretrained to ``out``."""
    tf = transformers_or_skip()
    cfg = tf.AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def grouped_norm_or_skip(model, groups: int) -> None:
    """Skip a logits comparison where the installed transformers' gated RMSNorm is not the reference:
    older versions normalise all groups at once; mamba_ssm (the models' own training code), megasleep
    and later transformers normalise each group on its own."""
    ungrouped = {type(m).__name__ for m in model.modules()
                 if type(m).__name__.endswith("RMSNormGated") and not hasattr(m, "group_size")}
    if groups > 1 and ungrouped:
        import transformers

        pytest.skip(f"transformers {transformers.__version__}'s {', '.join(sorted(ungrouped))} normalises all "
                    f"{groups} groups at once (mamba_ssm and later transformers: per group); not the reference")


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max |diff| {err:.3g} vs max |logit| {scale:.3g}"
