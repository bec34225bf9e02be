"""Checks a run makes before any rank starts: ``megasleep train CONFIG --check-only --world-size W``.

Contract: :func:`preflight` raises one exception whose one-line message names the config, the key(s)
and (for batch settings) the world size, or returns the DeepSpeed JSON the run would use. It needs
no process group, no model and no GPU, so a cluster script can call it on the login node before
queueing ranks; the trainer calls it again, with the real world size, before building anything.
"""

from __future__ import annotations

import os
from typing import Any

from megasleep.config import ConfigError, resolve_path
from megasleep.train.config import ExperimentConfig


def check_paths(cfg: ExperimentConfig) -> None:
    """Every file the run reads, so that a typo fails in a second with the path in the message."""
    from megasleep.train.checkpoint import resolve_resume

    if cfg.data.tokenizer and not resolve_path(cfg.data.tokenizer).is_file():
        raise ConfigError(f"{cfg.source}: data.tokenizer: {cfg.data.tokenizer}: no such tokenizer model")
    if cfg.data.source == "shards":
        from megasleep.data.manifest import resolve_shards

        for key in ("train", "val"):
            paths = getattr(cfg.data, key)
            if paths:
                try:
                    # sizes on every rank; sha256 once per shard set, by rank 0 (or the login node) alone
                    resolve_shards(paths, verify="once" if os.environ.get("RANK", "0") == "0" else None)
                except FileNotFoundError as exc:
                    raise ConfigError(f"{cfg.source}: data.{key}: {exc}") from None
    if cfg.checkpoint.init_from and not (resolve_path(cfg.checkpoint.init_from) / "config.json").is_file():
        raise ConfigError(f"{cfg.source}: checkpoint.init_from: {cfg.checkpoint.init_from}: not an exported model "
                          "directory (no config.json)")
    resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_path)  # a missing resume path fails here


def preflight(cfg: ExperimentConfig, world_size: int) -> dict[str, Any]:
    """All checks a run at ``world_size`` ranks makes before starting; returns its DeepSpeed JSON."""
    from megasleep.train.engine import build_ds_config

    if world_size < 1:
        raise ConfigError(f"{cfg.source}: world size {world_size}: need at least one rank")
    check_paths(cfg)
    from megasleep.train.checkpoint import preflight_resume

    # a checkpoint of another model, or one whose data position cannot follow this world size
    preflight_resume(cfg.checkpoint.resume, cfg.checkpoint_path, cfg.model_cfg.model_dump(mode="json"), world_size,
                     cfg.data.source)
    return build_ds_config(cfg, world_size)
