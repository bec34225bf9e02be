"""Weights I/O shared by every format: read safetensors (single or sharded through an index), read
weights-only pickles, write (sharded when large) with huggingface_hub, strip wrapper prefixes, and
replace a directory atomically.

Nothing here unpickles arbitrary objects: a pickle is read with ``torch.load(weights_only=True)`` and a
file that needs more is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path

import torch

from megasleep.checkpoint.errors import MissingCheckpointFileError, PretrainedError, UnsafeCheckpointError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
# wrapper prefixes: DeepSpeed's engine, the trainer's module, torch.compile, FSDP / DeepSpeed forward module
PREFIXES = ("module.", "model.", "_orig_mod.", "_forward_module.")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def strip_prefix(state: dict[str, torch.Tensor], prefixes=PREFIXES) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key (``module.``, ``model.``, ``_orig_mod.``, ...), repeatedly."""
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for pre in prefixes:
            if all(k.startswith(pre) for k in state):
                state = {k[len(pre):]: v for k, v in state.items()}
                changed = True
    return state


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingCheckpointFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PretrainedError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: top level must be an object")
    return data


def _listing(p: Path) -> str:
    return str(sorted(x.name for x in p.iterdir())[:20])


def weights_files(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle", files) of the weights in a checkpoint directory."""
    p = Path(path)
    if (p / WEIGHTS_NAME).is_file():
        return "safetensors", [p / WEIGHTS_NAME]
    for index_name, kind in ((WEIGHTS_INDEX_NAME, "safetensors"), (PICKLE_INDEX_NAME, "pickle")):
        if (p / index_name).is_file():
            index = read_json(p / index_name)
            names = sorted(set((index.get("weight_map") or {}).values()))
            if not names:
                raise PretrainedError(f"{p / index_name}: empty weight_map")
            missing = [n for n in names if not (p / n).is_file()]
            if missing:
                raise MissingCheckpointFileError(f"{p}: shards named in {index_name} are missing: {missing}")
            return kind, [p / n for n in names]
    for n in PICKLE_NAMES:
        if (p / n).is_file():
            return "pickle", [p / n]
    raise MissingCheckpointFileError(
        f"{p}: no weights found (expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or one of {list(PICKLE_NAMES)}; "
        f"files present: {_listing(p)})")


def load_pickled_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)``; anything needing arbitrary objects is refused."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).strip().splitlines()
        detail = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0] if lines else "")
        raise UnsafeCheckpointError(
            f"{path}: refusing to load a pickle that is not weights-only (torch.load(weights_only=True) "
            f"rejected it: {detail.strip()}). Loading it would execute arbitrary code; convert it to "
            f"safetensors from a trusted environment instead.") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise PretrainedError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return dict(obj)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors, sharded safetensors or weights-only pickles)."""
    kind, files = weights_files(path)
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        if kind == "pickle":
            part = load_pickled_weights(f)
        else:
            try:
                part = load_file(str(f), device="cpu")
            except Exception as exc:
                raise PretrainedError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        dup = set(part) & set(out)
        if dup:
            raise PretrainedError(f"{f}: tensors {sorted(dup)[:5]} also appear in another shard")
        out.update(part)
    return out


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``; an existing ``out`` is swapped out first, so
    ``out`` is never a half-written directory."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def temp_dir_for(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    return tmp


def save_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_size: int | str = "5GB") -> None:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index when larger than a shard
    (huggingface_hub's writer: the layout transformers and ``load_weights`` read back)."""
    from huggingface_hub import save_torch_state_dict

    # a view into a larger buffer (e.g. DeepSpeed's flat fp32 partitions) is copied out so that only its
    # own elements are written
    tensors = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
               for k, v in tensors.items()}
    save_torch_state_dict(tensors, directory, max_shard_size=max_shard_size,
                          metadata={"format": "pt", "producer": "megasleep"})


__all__ = ["CONFIG_NAME", "PICKLE_NAMES", "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "dtype_name", "load_pickled_weights",
           "load_weights", "parse_dtype", "read_json", "replace_dir", "save_weights", "strip_prefix", "temp_dir_for",
           "weights_files"]
