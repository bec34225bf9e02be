"""What the streaming engine needs from a checkpoint directory: the model (any format an adapter reads,
see megasleep/checkpoint/load.py), its recorded sleep settings, its tokenizer, and a vocabulary check."""

from __future__ import annotations

from pathlib import Path

import torch

from megasleep.checkpoint.load import load_pretrained
from megasleep.checkpoint.released import tokenizer_path
from megasleep.checkpoint.weights import CONFIG_NAME, read_json


def read_checkpoint_config(path: str | Path) -> dict:
    """The raw config.json of a checkpoint directory (clear error for a missing directory / file)."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    if not (p / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{p / CONFIG_NAME} not found: a checkpoint directory holds {CONFIG_NAME} and "
                                f"its weights")
    return read_json(p / CONFIG_NAME)


def load_model(path: str | Path, device=None, dtype: torch.dtype | None = None):
    """The model of checkpoint directory ``path`` in eval mode; ``model.pretrained_meta["format"]`` names
    the adapter that read it."""
    read_checkpoint_config(path)
    return load_pretrained(path, device=device, dtype=dtype).eval()


# the SleepConfig switches that change the forward pass itself (not only training): a model trained with
# them computes something else without them, so evaluation and generation take them from the checkpoint
FORWARD_SWITCHES = ("reinject", "feedback_norm")


def trained_forward_switches(sleep: dict | None) -> dict[str, bool]:
    """``{"reinject": ..., "feedback_norm": ...}`` as recorded in a checkpoint's ``sleep`` settings
    (False where not recorded: the paper's method)."""
    sleep = sleep if isinstance(sleep, dict) else {}
    return {k: bool(sleep.get(k, False)) for k in FORWARD_SWITCHES}


def default_tokenizer_path(path: str | Path) -> Path | None:
    return tokenizer_path(path)


def check_vocab(model, tokenizer, where: str = "") -> None:
    """A checkpoint and a tokenizer must agree on the vocabulary size."""
    mv, tv = model.config.vocab_size, tokenizer.vocab_size
    if mv != tv:
        raise ValueError(f"vocabulary mismatch: the checkpoint{where} has vocab_size={mv} but the tokenizer "
                         f"{getattr(tokenizer, 'path', None) or ''} has {tv} pieces")
