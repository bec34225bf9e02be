"""Load any supported checkpoint directory as a HybridLM: a megasleep export, or a foreign family
through its adapter (mamba_ssm, transformers' llama / qwen2 / mamba2 ...). Says which adapter it used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from megasleep.checkpoint.adapters.registry import adapter_for
from megasleep.checkpoint.errors import MissingCheckpointFileError, PretrainedError
from megasleep.checkpoint.released import (
    build_from_state_dict,
    is_megasleep_config,
    read_native,
    resolve_dtype,
)
from megasleep.checkpoint.weights import CONFIG_NAME, load_weights, read_json
from megasleep.models.config import ModelConfig

NATIVE = "megasleep"


def _config_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise MissingCheckpointFileError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise PretrainedError(f"{p}: expected a checkpoint directory (config.json + weights), got a file")
    if not (p / CONFIG_NAME).is_file():
        raise MissingCheckpointFileError(
            f"{p}: missing {CONFIG_NAME} (files present: {sorted(x.name for x in p.iterdir())[:20]})")
    return p / CONFIG_NAME


def detect_format(path: str | os.PathLike) -> str:
    """Name of the adapter that reads this directory ("megasleep" for a native export)."""
    cfg_path = _config_path(path)
    raw = read_json(cfg_path)
    return NATIVE if is_megasleep_config(raw) else adapter_for(raw, str(cfg_path)).name


def read_checkpoint(path: str | os.PathLike, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(ModelConfig, HybridLM state dict, metadata) of any supported checkpoint directory.

    ``overrides``: ModelConfig fields that change no tensor shape (e.g. ``n_prelude`` / ``n_coda``).
    ``metadata["format"]`` names the adapter; a foreign import's key map is ``metadata["import"]``."""
    p = Path(path)
    raw = read_json(_config_path(p))
    if is_megasleep_config(raw):
        cfg, state, meta = read_native(p, overrides)
        return cfg, state, {**meta, "format": NATIVE}
    adapter = adapter_for(raw, str(p / CONFIG_NAME))
    cfg, state, report = adapter.convert(raw, load_weights(p), str(p), overrides)
    return cfg, state, {"format": adapter.name, "import": report, "tokenizer": None, "sleep": None,
                        "source": {"kind": adapter.name, "path": str(p.resolve()),
                                   "model_type": raw.get("model_type", adapter.name)}}


def load_pretrained(path: str | os.PathLike, device=None, dtype=None, **overrides):
    """HybridLM from any supported checkpoint directory, in eval mode.

    ``dtype``: None keeps float32 (weights stored in another dtype are converted), "auto" keeps the stored
    dtype, or any torch dtype / name. ``model.pretrained_meta`` holds the metadata (``format`` = adapter).
    """
    p = Path(path)
    cfg, state, meta = read_checkpoint(p, **overrides)
    model = build_from_state_dict(cfg, state, device=device, dtype=resolve_dtype(dtype, state), where=str(p))
    model.pretrained_meta = {**meta, "path": str(p.resolve())}
    return model


from_pretrained = load_pretrained


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What an evaluation records about a checkpoint (path, format, config, tokenizer, sleep settings)."""
    p = Path(path)
    fmt = detect_format(p)
    info: dict[str, Any] = {"path": str(p.resolve()), "format": fmt}
    if fmt == NATIVE:
        from megasleep.checkpoint.released import read_config

        cfg, meta = read_config(p)
        info.update(config=cfg.model_dump(mode="json"), tokenizer=meta.get("tokenizer"), sleep=meta.get("sleep"),
                    source=meta.get("source"), megasleep_version=meta.get("megasleep_version"))
    else:
        info.update(source_config=read_json(p / CONFIG_NAME))
    return info


__all__ = ["checkpoint_info", "detect_format", "from_pretrained", "load_pretrained", "read_checkpoint"]
