"""Training checkpoints are read weights-only: a planted pickle payload never runs unless trusted.

``torch.load(weights_only=False)`` runs whatever a pickle names, so a checkpoint directory someone
else wrote (a shared scratch space, a download) could execute code through ``checkpoint.resume``,
``--eval-only`` or ``megasleep export``. DeepSpeed unpickles its own files with ``weights_only=False``
internally, so every file is first *verified* here with PyTorch's weights-only unpickler, allowing
only the few globals our own training checkpoints hold (below); then DeepSpeed may read it. Verifying
maps the tensors (``mmap=True``) instead of reading them, so it costs little even for large shards.

Anything else is refused with :class:`UntrustedCheckpoint`, naming the file and the globals, unless
the user passes ``--trust-checkpoint`` (``checkpoint.trust=true`` in an experiment config).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

TRUST_HINT = "pass --trust-checkpoint (checkpoint.trust=true) only if you trust whoever wrote it"


class UntrustedCheckpoint(ValueError):
    """A checkpoint file needs globals beyond our allow-list: loading it could run arbitrary code."""


def training_globals() -> list[Any]:
    """What our trainer's checkpoints pickle besides tensors and plain containers.

    * ``megasleep_rank*.pt``: numpy's RNG state (an ndarray of uint32);
    * DeepSpeed's ZeRO optimizer files: the ZeRO stage enum, the (static) loss scaler object, and
      ZeRO-1/2's parameter fragment addresses.
    """
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), LossScaler, ZeroStageEnum,
            fragment_address]


def _global_names(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a zip-format file: the unpickler's own message names what failed
        return []


def safe_load(path: str | Path, trust: bool = False, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` of one training-checkpoint file: weights-only with our allow-list, or
    unrestricted when ``trust`` is set."""
    path = Path(path)
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        with torch.serialization.safe_globals(training_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in training_globals()}
        names = [n for n in _global_names(path) if n not in allowed]
        what = f"pickled globals {names}" if names else f"objects the weights-only loader refuses ({_first_line(exc)})"
        raise UntrustedCheckpoint(f"{path}: contains {what} that a megasleep training checkpoint never holds; "
                                  f"loading it could run code from the file. {TRUST_HINT}") from None
    except RuntimeError as exc:
        if "mmap" in str(exc) and mmap:  # legacy (non-zip) files cannot be mapped: read them instead
            return safe_load(path, trust, map_location, mmap=False)
        raise


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def verify_files(paths: Iterable[str | Path], trust: bool = False) -> int:
    """Check that every file loads weights-only (tensors mapped, not read); returns how many were checked."""
    if trust:
        return 0
    n = 0
    for p in paths:
        safe_load(p, mmap=True)
        n += 1
    return n


def checkpoint_files(tag_dir: str | Path) -> list[Path]:
    """Every pickle of one checkpoint tag directory (DeepSpeed's and ours, universal sub-folders too)."""
    return sorted(p for p in Path(tag_dir).rglob("*.pt") if p.is_file())


def verify_checkpoint(tag_dir: str | Path, trust: bool = False) -> int:
    """Verify a whole tag directory before DeepSpeed (or zero_to_fp32) unpickles it."""
    return verify_files(checkpoint_files(tag_dir), trust)
