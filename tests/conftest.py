"""Shared fixtures: tiny random models of every mixer type, deterministic seeds, CPU threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(pattern: str = "AGMA", n_prelude: int = 0, n_coda: int = 0, vocab: int = 61, d: int = 32, **kw):
    from megasleep.models import ModelConfig

    base = dict(name="test", vocab_size=vocab, d_model=d, pattern=pattern, n_prelude=n_prelude, n_coda=n_coda,
                attn=dict(n_heads=4, n_kv_heads=2), mamba2=dict(d_state=8, headdim=8, expand=2, chunk_size=8),
                gdn=dict(n_heads=2, head_dim=8, chunk_size=8), mlp=dict(A=2.0, G=2.0, M=1.0), kernels="torch")
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(pattern: str = "AGMA", seed: int = 0, dtype=torch.float64, **kw):
    from megasleep.models import HybridLM

    torch.manual_seed(seed)
    model = HybridLM(tiny_config(pattern, **kw)).to(dtype)
    return model


@pytest.fixture
def root() -> Path:
    return ROOT
