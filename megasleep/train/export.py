"""Consolidated, HF-style export at the end of training (the format the evaluation side reads).

The format and its writer/reader are ``megasleep.models.pretrained`` (``config.json`` = ModelConfig
fields + ``megasleep_version`` + ``sleep`` + ``tokenizer``; ``model.safetensors`` with HybridLM names,
the tied LM head stored once; ``tokenizer.model``). This module only gathers the weights from a
training run: from the live module (ZeRO 0-2 hold full fp32 parameters on every rank) or, for ZeRO-3,
through DeepSpeed's own ``zero_to_fp32`` on the checkpoint just saved. ``megasleep export`` does the
same for any saved checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megasleep.models.config import ModelConfig

PREFIX = "model."  # the trainer wraps HybridLM in a module whose attribute is `model`


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(PREFIX) for k in state):
        return {k[len(PREFIX):]: v for k, v in state.items()}
    return dict(state)


def export_state_dict(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | Path,
                      tokenizer_path: str | Path | None = None, sleep: dict | None = None,
                      source: dict[str, Any] | None = None) -> Path:
    """Write an exported directory (atomically) from a state dict with HybridLM (or wrapped) names."""
    from megasleep.models.pretrained import save_state_dict_pretrained

    state = {k: v.detach().to(torch.float32).cpu() for k, v in strip_prefix(state).items()}
    return save_state_dict_pretrained(state, model_cfg, out_dir, tokenizer_path, sleep=sleep, source=source)


def load_exported(path: str | Path, device: str | torch.device = "cpu"):
    from megasleep.models.pretrained import load_pretrained

    return load_pretrained(path, device=device)


def consolidated_from_zero(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO checkpoint via DeepSpeed's zero_to_fp32 (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return strip_prefix(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
