"""DeepSpeed training checkpoints -> a HybridLM state dict + config (then written in the released format).

Consolidation uses DeepSpeed's own ``deepspeed.utils.zero_to_fp32`` (ZeRO 1-3, any number of ranks, fp32
master weights); a stage-0 checkpoint is read from its ``mp_rank_00_model_states.pt``. The model config
comes from the trainer's marker ``<tag>/megasleep.json`` (``config.model``, with ``config.sleep`` and the
tokenizer path) or from a model / experiment YAML or a config.json given explicitly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megasleep.checkpoint.released import save_state_dict_pretrained
from megasleep.checkpoint.weights import strip_prefix
from megasleep.models.config import ModelConfig

SLEEP_KEYS = ("window", "passes", "eviction", "random_passes")


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints dir, tag) from a run dir, a checkpoints dir or a tag dir."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p}")
    if (p / "mp_rank_00_model_states.pt").is_file() or any(p.glob("*_model_states.pt")):
        return p.parent, p.name
    if (p / "checkpoints").is_dir() and not (p / "latest").is_file():
        p = p / "checkpoints"
    if tag is None:
        latest = p / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
        else:
            tags = sorted(d.name for d in p.iterdir() if d.is_dir() and any(d.glob("*model_states.pt")))
            if not tags:
                raise FileNotFoundError(f"{p}: no DeepSpeed checkpoint here (no `latest` file and no tag directory "
                                        f"with *model_states.pt)")
            tag = max(tags, key=lambda t: (len(t), t))
    if not (p / tag).is_dir():
        raise FileNotFoundError(f"{p / tag}: checkpoint tag directory not found")
    return p, tag


def model_config_from_file(path: Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, sleep dict) from a config.json, a model YAML or an experiment YAML."""
    from megasleep.config import read_config_file
    from megasleep.models.config import load_model_config

    sleep = {} if path.suffix == ".json" else read_config_file(path).get("sleep") or {}
    return load_model_config(path), sleep


def consolidated_from_zero(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO checkpoint via DeepSpeed's zero_to_fp32 (no process group needed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return strip_prefix(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))


def read_training_checkpoint(ckpt_dir: Path, tag: str, config: str | None = None, trust: bool = False):
    """(state dict, ModelConfig, sleep dict, tokenizer path, provenance) of a DeepSpeed checkpoint. Every
    file is first verified weights-only (trust.py; ``trust`` skips that): zero_to_fp32 unpickles freely."""
    from megasleep.checkpoint.trust import safe_load, verify_checkpoint
    from megasleep.config import validate

    tag_dir = ckpt_dir / tag
    marker = {}
    if (tag_dir / "megasleep.json").is_file():
        marker = json.loads((tag_dir / "megasleep.json").read_text())
    sleep: dict = {}
    if config is not None:
        cfg, sleep = model_config_from_file(Path(config))
    elif isinstance((marker.get("config") or {}).get("model"), dict):
        cfg = validate(ModelConfig, marker["config"]["model"], f"{tag_dir / 'megasleep.json'}: config.model")
        sleep = marker["config"].get("sleep") or {}
    else:
        raise ValueError(f"{tag_dir}: no model config (no megasleep.json marker with config.model); "
                         f"pass --config MODEL.yaml")
    verify_checkpoint(tag_dir, trust)
    zero_files = list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")) + list(tag_dir.glob("zero_pp_rank_*"))
    if zero_files:
        state, how = consolidated_from_zero(ckpt_dir, tag), "zero_to_fp32"
    else:
        f = tag_dir / "mp_rank_00_model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{tag_dir}: neither ZeRO shards nor mp_rank_00_model_states.pt")
        state, how = strip_prefix(safe_load(f, trust)["module"]), "model_states"
    tok = marker.get("tokenizer_path")
    source = {"kind": "deepspeed", "checkpoint": str(tag_dir.resolve()), "tag": tag, "step": marker.get("step"),
              "consolidation": how, "data": marker.get("data")}
    sleep = {k: v for k, v in dict(sleep or {}).items() if k in SLEEP_KEYS}
    return state, cfg, sleep, (Path(tok) if tok else None), source


def export_state_dict(state: dict[str, torch.Tensor], model_cfg: ModelConfig, out_dir: str | Path,
                      tokenizer_path: str | Path | None = None, sleep: dict | None = None,
                      source: dict[str, Any] | None = None) -> Path:
    """Write an exported directory (atomically, fp32) from a state dict with HybridLM (or wrapped) names."""
    state = {k: v.detach().to(torch.float32).cpu() for k, v in strip_prefix(state).items()}
    return save_state_dict_pretrained(state, model_cfg, out_dir, tokenizer_path, sleep=sleep, source=source)


__all__ = ["consolidated_from_zero", "export_state_dict", "model_config_from_file", "read_training_checkpoint",
           "resolve_checkpoint"]
