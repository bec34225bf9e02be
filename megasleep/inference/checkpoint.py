"""Load an HF-style checkpoint directory for inference and check it against its tokenizer.

Directory layout (written by ``megasleep.models.pretrained.save_pretrained``)::

    config.json          ModelConfig.model_dump() + "megasleep_version" (+ optional "sleep": {...})
    model.safetensors    the weights (tied lm_head may be absent)
    tokenizer.model      optional sentencepiece model

``megasleep.models.pretrained.load_pretrained`` is used when it is installed; otherwise a minimal
reader of the same format below.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megasleep.models.hybrid import HybridLM

CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.model"


def read_checkpoint_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    cfg = p / CONFIG
    if not cfg.exists():
        raise FileNotFoundError(f"{cfg} not found: a checkpoint directory holds {CONFIG} and {WEIGHTS}")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg}: not valid JSON ({exc})") from exc


def _load_fallback(path: Path) -> HybridLM:
    from safetensors.torch import load_file

    from megasleep.models.config import ModelConfig

    raw = read_checkpoint_config(path)
    data = {k: v for k, v in raw.items() if k in ModelConfig.model_fields}
    try:
        cfg = ModelConfig(**data)
    except Exception as exc:  # pydantic ValidationError: say which file
        raise ValueError(f"{path / CONFIG}: invalid model config: {exc}") from exc
    weights = path / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found")
    model = HybridLM(cfg)
    state = load_file(str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise ValueError(f"{weights}: weights do not match the config in {CONFIG} "
                         f"(missing {sorted(set(missing) - allowed)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model


def load_model(path: str | Path, device=None, dtype: torch.dtype | None = None) -> HybridLM:
    """The model of checkpoint directory ``path`` in eval mode (on ``device``, cast to ``dtype``)."""
    path = Path(path)
    read_checkpoint_config(path)   # clear error for a missing directory / config first
    try:
        from megasleep.models.pretrained import load_pretrained
    except ModuleNotFoundError as exc:
        if exc.name != "megasleep.models.pretrained":
            raise
        model = _load_fallback(path)
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
    else:
        model = load_pretrained(path, device=device, dtype=dtype)
    return model.eval()


def default_tokenizer_path(path: str | Path) -> Path | None:
    p = Path(path) / TOKENIZER
    return p if p.exists() else None


def check_vocab(model: HybridLM, tokenizer, where: str = "") -> None:
    """A checkpoint and a tokenizer must agree on the vocabulary size."""
    mv, tv = model.config.vocab_size, tokenizer.vocab_size
    if mv != tv:
        raise ValueError(f"vocabulary mismatch: the checkpoint{where} has vocab_size={mv} but the tokenizer "
                         f"{getattr(tokenizer, 'path', None) or ''} has {tv} pieces")
