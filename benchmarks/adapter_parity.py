"""Logits parity of every transformers adapter, printed: tiny random models built from config (no download),
megasleep's HybridLM (window >= T, N = 1, fp32) vs the family's own transformers implementation.
The tests in tests/checkpoint assert <= 1e-4 relative; this prints the measured error.

    PYTHONPATH=. python benchmarks/adapter_parity.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from megasleep.checkpoint.load import load_pretrained
from tests.checkpoint.hf_models import build_hf
from tests.checkpoint.test_hf_attention import SMALL as ATTN
from tests.checkpoint.test_hf_hybrid import CASES as HYBRIDS
from tests.checkpoint.test_nemotron_h import SMALL as NEMOTRON

MAMBA2 = dict(hidden_size=32, num_hidden_layers=2, vocab_size=64, num_heads=8, head_dim=8, state_size=8, n_groups=2,
              expand=2, chunk_size=8, layer_norm_epsilon=1e-6)
CASES = {"llama": ("llama", ATTN), "qwen2": ("qwen2", ATTN), "mamba2": ("mamba2", MAMBA2),
         **{k: (k.split("-")[0], v) for k, v in HYBRIDS.items()},
         "nemotron_h": ("nemotron_h", dict(num_hidden_layers=6, hybrid_override_pattern="M-*-M*", **NEMOTRON))}


def main() -> None:
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    for name, (model_type, kw) in CASES.items():
        with tempfile.TemporaryDirectory() as d:
            src = build_hf(model_type, Path(d) / "hf", **kw)
            model = load_pretrained(Path(d) / "hf")
            with torch.no_grad():
                got, want = model(ids), src(ids).logits
        err, scale = float((got - want).abs().max()), float(want.abs().max())
        print(f"{name:24s} adapter {model.pretrained_meta['format']:26s} max|diff| {err:.2e}  "
              f"max|logit| {scale:.2e}  relative {err / scale:.2e}")


if __name__ == "__main__":
    main()
