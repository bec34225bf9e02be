"""Tiny random transformers models built from config (no download) for the adapter parity tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


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


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * max(scale, 1.0), f"max |diff| {err:.3g} vs max |logit| {scale:.3g}"
