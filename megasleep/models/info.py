"""`megasleep model-info CONFIG`: build the model on the meta device and report its size."""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from megasleep.models.config import load_model_config
from megasleep.models.hybrid import HybridLM

# Parameter targets of docs/sleep.md#model-sizes (name -> approximate parameter count); "tiny" is an upper bound.
# tiny-* are the CPU test / study models (tiny-ag: the 2-block Rule-110 study model), all bounded at < 2M.
TARGET_PARAMS = {"tiny": 2e6, "tiny-mamba": 2e6, "tiny-ag": 2e6, "paper-rule110": 3e6, "paper-depo": 35e6,
               "350m": 350e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "7b": 7e9}


def count(cfg) -> dict:
    with torch.device("meta"):
        model = HybridLM(cfg)
    per_kind = Counter()
    for blk in model.layers:
        per_kind[blk.kind] += sum(p.numel() for p in blk.parameters())
    total = model.num_parameters()
    return {"total": total, "non_embedding": model.num_parameters(exclude_embeddings=True),
            "per_mixer": dict(per_kind), "blocks": len(model.layers)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="+", help="model YAML file(s)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides")


def main(args) -> int:
    configs = [c for c in args.config if "=" not in c]
    overrides = [c for c in args.config if "=" in c] + list(args.overrides)
    print(f"{'config':<34}{'blocks':>7}{'params':>14}{'non-emb':>14}{'target':>12}{'ratio':>8}")
    for path in configs:
        cfg = load_model_config(path, overrides)
        c = count(cfg)
        target = TARGET_PARAMS.get(cfg.name)
        ratio = f"{c['total'] / target:.2f}" if target else "-"
        tgt = f"{target / 1e6:,.0f}M" if target else "-"
        print(f"{str(path):<34}{c['blocks']:>7}{c['total']:>14,}{c['non_embedding']:>14,}{tgt:>12}{ratio:>8}")
        print("    per mixer: " + ", ".join(f"{k}={v:,}" for k, v in c["per_mixer"].items())
              + f"; pattern {cfg.pattern} (prelude {cfg.n_prelude}, coda {cfg.n_coda})")
    return 0
