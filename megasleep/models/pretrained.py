"""Released-checkpoint format: ``save_pretrained`` / ``load_pretrained`` (a.k.a. ``from_pretrained``).

An exported model is a Hugging-Face-style directory::

    <dir>/config.json         the ModelConfig fields at top level (``ModelConfig.model_dump()``) plus
                              "model_type": "megasleep", "format_version", "megasleep_version",
                              "torch_dtype", "tied_weights" {alias: stored name}, and optional
                              "tokenizer" {file, hash, vocab_size, ...}, "sleep" (the sleep settings the
                              model was trained with: window, passes, eviction), "source" (provenance)
    <dir>/model.safetensors   the weights under HybridLM state-dict names; a tied tensor is stored once
                              (``lm_head.weight`` -> ``embed_tokens.weight``) and re-tied on load
    <dir>/tokenizer.model     the sentencepiece model, when there is one

Loading is strict: every tensor the config implies must be in the file with the right shape and nothing
else may be (the error names the tensors). Weights come from safetensors (also sharded:
``model.safetensors.index.json``); a pickled ``pytorch_model.bin`` / ``*.pt`` is read only through
``torch.load(weights_only=True)``: a pickle that needs arbitrary Python objects is refused, never run.

A directory written by ``mamba_ssm``'s ``MambaLMHeadModel.save_pretrained`` (``config.json`` with
``n_layer`` / ``ssm_cfg`` + ``pytorch_model.bin``) is recognised and converted on the fly by
:mod:`megasleep.eval.mamba_import`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from megasleep.models.config import ModelConfig

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "pytorch_model.pt")
TOKENIZER_NAME = "tokenizer.model"
# keys of config.json that are not ModelConfig fields but belong to the format
META_KEYS = ("model_type", "format_version", "megasleep_version", "torch_dtype", "tied_weights", "tokenizer",
             "sleep", "source", "architectures")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


class PretrainedError(ValueError):
    """A checkpoint directory cannot be loaded (the message says which file / tensor and why)."""


class MissingCheckpointFileError(PretrainedError, FileNotFoundError):
    """The directory lacks config.json, the weights, or a file the config points to."""


class WeightsMismatchError(PretrainedError):
    """The weights do not fit the config: missing / unexpected tensors or wrong shapes (all named)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


class UnsafeCheckpointError(PretrainedError):
    """A pickled weights file that ``torch.load(weights_only=True)`` refuses (it would run code)."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------------ save
def _dedup_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store each shared tensor once: returns (tensors, {alias: stored name})."""
    first: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.device.type != "meta" else None
        if key is not None and key in first:
            tied[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        out[name] = t
    return out, tied


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` directory to ``out``; an existing ``out`` is swapped out first, so
    ``out`` is never a half-written directory."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_state_dict_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
                               tokenizer_path: str | os.PathLike | None = None, *, sleep: dict | None = None,
                               source: dict | None = None, dtype=None, tied_weights: dict[str, str] | None = None,
                               check: bool = True) -> Path:
    """Write a state dict (HybridLM names) + config as an exported directory, atomically.

    ``tied_weights`` {alias: name}: aliases are dropped (found automatically for shared tensors; with
    ``cfg.tie_embeddings`` ``lm_head.weight`` is always an alias of ``embed_tokens.weight``).
    ``check`` validates names and shapes against ``cfg`` before anything is written.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    state = dict(state)
    tensors, tied = _dedup_tied(state)
    tied.update(tied_weights or {})
    if cfg.tie_embeddings:
        head, emb = tensors.get("lm_head.weight"), tensors.get("embed_tokens.weight")
        if head is not None and emb is not None and not torch.equal(head.detach().cpu(), emb.detach().cpu()):
            raise WeightsMismatchError(f"{out}: config ties lm_head.weight to embed_tokens.weight but the state "
                                       f"dict holds two different tensors", mismatched=[("lm_head.weight", (), ())])
        tied["lm_head.weight"] = "embed_tokens.weight"
    for alias in tied:
        tensors.pop(alias, None)
    if check:
        full = dict(tensors)
        for alias, name in tied.items():
            if name in full:
                full[alias] = full[name]
        _raise_on_mismatch(cfg, full, where=str(out))
    target = parse_dtype(dtype)
    stored_dtypes = set()
    cpu: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach()
        if target is not None and v.is_floating_point():
            v = v.to(target)
        stored_dtypes.add(v.dtype)
        cpu[k] = v.to("cpu").contiguous()
    tok_info = None
    if tokenizer_path is not None:
        tok_path = Path(tokenizer_path)
        if not tok_path.is_file() and Path(str(tok_path) + ".model").is_file():
            tok_path = Path(str(tok_path) + ".model")
        if not tok_path.is_file():
            raise MissingCheckpointFileError(f"tokenizer file not found: {tok_path}")
        tok_info = _tokenizer_info(tok_path)
    meta = cfg.model_dump(mode="json")
    meta.update({
        "model_type": "megasleep",
        "architectures": ["HybridLM"],
        "format_version": FORMAT_VERSION,
        "megasleep_version": _version(),
        "torch_dtype": dtype_name(next(iter(stored_dtypes))) if len(stored_dtypes) == 1 else "mixed",
        "tied_weights": dict(sorted(tied.items())),
        "tokenizer": tok_info,
        "sleep": sleep,
        "source": source,
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        save_file(cpu, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "producer": "megasleep"})
        if tokenizer_path is not None:
            shutil.copyfile(tok_path, tmp / TOKENIZER_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pretrained(model, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, *,
                    sleep=None, source: dict | None = None, dtype=None) -> Path:
    """Export ``model`` (a HybridLM) to ``out_dir`` (config.json + model.safetensors [+ tokenizer.model]).

    ``sleep``: a SleepConfig or dict recorded as the model's training sleep settings (eval defaults).
    ``dtype``: store floating tensors in this dtype (default: as they are)."""
    if sleep is not None and hasattr(sleep, "model_dump"):
        sleep = sleep.model_dump(mode="json")
    return save_state_dict_pretrained(model.state_dict(), model.config, out_dir, tokenizer_path, sleep=sleep,
                                      source=source, dtype=dtype, check=False)


def _tokenizer_info(path: Path) -> dict:
    try:
        from megasleep.data.tokenizer import load_tokenizer

        info = load_tokenizer(path).info()
        info.pop("path", None)
    except Exception as exc:  # not a sentencepiece model: still copied, recorded by hash only
        import hashlib

        info = {"hash": hashlib.sha256(path.read_bytes()).hexdigest(), "note": f"not loadable: {exc}"}
    return {"file": TOKENIZER_NAME, **info}


def _version() -> str:
    import megasleep

    return megasleep.__version__


# ------------------------------------------------------------------------------------------------ load
def detect_format(path: str | os.PathLike) -> str:
    """"megasleep" | "mamba_ssm" for a checkpoint directory (raises when it is neither)."""
    p = Path(path)
    if not p.exists():
        raise MissingCheckpointFileError(f"checkpoint directory not found: {p}")
    if not p.is_dir():
        raise PretrainedError(f"{p}: expected a checkpoint directory (config.json + weights), got a file")
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise MissingCheckpointFileError(
            f"{p}: missing {CONFIG_NAME} (files present: {sorted(x.name for x in p.iterdir())[:20]})")
    raw = _read_json(cfg_path)
    if raw.get("model_type") == "megasleep" or {"vocab_size", "d_model", "pattern"} <= set(raw):
        return "megasleep"
    if "n_layer" in raw and "d_model" in raw and ("ssm_cfg" in raw or "attn_layer_idx" in raw):
        return "mamba_ssm"
    raise PretrainedError(f"{cfg_path}: neither a megasleep export (model_type 'megasleep', or d_model / pattern "
                          f"/ vocab_size) nor a mamba_ssm MambaLMHeadModel config (n_layer / ssm_cfg); "
                          f"keys: {sorted(raw)[:20]}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PretrainedError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path}: top level must be an object")
    return data


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, metadata) of a megasleep export directory (metadata = the non-model keys)."""
    from megasleep.config import validate

    p = Path(path)
    raw = _read_json(p / CONFIG_NAME)
    fields = set(ModelConfig.model_fields)
    cfg = validate(ModelConfig, {k: v for k, v in raw.items() if k in fields}, str(p / CONFIG_NAME))
    meta = {k: v for k, v in raw.items() if k not in fields}
    return cfg, meta


def weights_files(path: str | os.PathLike) -> tuple[str, list[Path]]:
    """("safetensors" | "pickle", files) of the weights in a checkpoint directory."""
    p = Path(path)
    if (p / WEIGHTS_NAME).is_file():
        return "safetensors", [p / WEIGHTS_NAME]
    if (p / WEIGHTS_INDEX_NAME).is_file():
        index = _read_json(p / WEIGHTS_INDEX_NAME)
        names = sorted(set((index.get("weight_map") or {}).values()))
        if not names:
            raise PretrainedError(f"{p / WEIGHTS_INDEX_NAME}: empty weight_map")
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise MissingCheckpointFileError(f"{p}: shards named in {WEIGHTS_INDEX_NAME} are missing: {missing}")
        return "safetensors", [p / n for n in names]
    for n in PICKLE_NAMES:
        if (p / n).is_file():
            return "pickle", [p / n]
    raise MissingCheckpointFileError(
        f"{p}: no weights found (expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or one of {list(PICKLE_NAMES)}; "
        f"files present: {sorted(x.name for x in p.iterdir())[:20]})")


def load_pickled_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)``; anything needing arbitrary objects is refused."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported" in line or "GLOBAL" in line), first[0] if first else "")
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
    """All tensors of a checkpoint directory (safetensors, sharded safetensors or a weights-only pickle)."""
    kind, files = weights_files(path)
    if kind == "pickle":
        return load_pickled_weights(files[0])
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except Exception as exc:
            raise PretrainedError(f"{f}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
        dup = set(part) & set(out)
        if dup:
            raise PretrainedError(f"{f}: tensors {sorted(dup)[:5]} also appear in another shard")
        out.update(part)
    return out


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name -> shape a HybridLM with ``cfg`` has (built on the meta device: no memory)."""
    from megasleep.models.hybrid import HybridLM

    with torch.device("meta"):
        model = HybridLM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def compare_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor]):
    """(missing, unexpected, mismatched) names against a HybridLM with ``cfg``."""
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    mismatched = [(k, tuple(state[k].shape), want[k]) for k in want if k in state and tuple(state[k].shape) != want[k]]
    return missing, unexpected, mismatched


def _fmt(names, n=12) -> str:
    names = list(names)
    more = f" ... (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(str(x) for x in names[:n]) + more


def _raise_on_mismatch(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
    missing, unexpected, mismatched = compare_state_dict(cfg, state)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) the config needs are missing from the weights: {_fmt(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} tensor(s) in the weights are not in the model: {_fmt(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es) (name: weights vs config): "
                     + _fmt(f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched))
    raise WeightsMismatchError(f"{where}: config/weights mismatch: " + "; ".join(parts),
                               missing, unexpected, mismatched)


def build_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], device=None, dtype=None,
                          where: str = "<state dict>"):
    """A HybridLM with ``cfg`` holding ``state`` (strict). Built on the meta device then materialised, so
    no random initialisation is paid for; parameter objects (and their flags) are the model's own."""
    from megasleep.models.hybrid import HybridLM

    state = dict(state)
    if cfg.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    _raise_on_mismatch(cfg, state, where)
    if cfg.tie_embeddings and not torch.equal(state["lm_head.weight"], state["embed_tokens.weight"]):
        raise WeightsMismatchError(f"{where}: config ties lm_head.weight to embed_tokens.weight but the weights "
                                   f"hold two different tensors", mismatched=[("lm_head.weight", (), ())])
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        model = HybridLM(cfg)
    # to_empty makes new Parameter objects: keep their flags (_no_weight_decay, _keep_fp32, ...)
    flags = {n: dict(vars(p)) for n, p in model.named_parameters() if vars(p)}
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        for k, v in flags.get(n, {}).items():
            setattr(p, k, v)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval()


def load_pretrained(path: str | os.PathLike, device=None, dtype=None, **overrides):
    """HybridLM from an exported directory (megasleep format, or a mamba_ssm MambaLMHeadModel directory).

    ``dtype``: None keeps float32 (weights stored in another dtype are converted), "auto" keeps the stored
    dtype, or any torch dtype / name. ``overrides``: ModelConfig fields to change that do not alter any
    tensor shape (e.g. ``n_prelude=2, n_coda=2`` to loop only the middle blocks, ``kernels="torch"``).
    The model is returned in eval mode; ``model.pretrained_meta`` holds the config's metadata.
    """
    p = Path(path)
    fmt = detect_format(p)
    if fmt == "mamba_ssm":
        from megasleep.eval.mamba_import import load_mamba_ssm

        return load_mamba_ssm(p, device=device, dtype=dtype, **overrides)
    cfg, meta = read_config(p)
    if overrides:
        from megasleep.config import validate

        cfg = validate(ModelConfig, {**cfg.model_dump(), **overrides}, f"{p / CONFIG_NAME} (with overrides)")
    state = load_weights(p)
    for alias, name in (meta.get("tied_weights") or {}).items():
        if alias not in state and name in state:
            state[alias] = state[name]
    if dtype == "auto":
        stored = {v.dtype for v in state.values() if v.is_floating_point()}
        dtype = next(iter(stored)) if len(stored) == 1 else torch.float32
    elif dtype is None:
        dtype = torch.float32
    model = build_from_state_dict(cfg, state, device=device, dtype=dtype, where=str(p))
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("file") and not (p / tok["file"]).is_file():
        raise MissingCheckpointFileError(f"{p}: config.json names tokenizer file {tok['file']!r} but it is missing")
    model.pretrained_meta = {**meta, "path": str(p.resolve()), "format": "megasleep"}
    return model


from_pretrained = load_pretrained


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The tokenizer file of a checkpoint directory, if it has one."""
    p = Path(path)
    try:
        _, meta = read_config(p)
        tok = meta.get("tokenizer")
        if isinstance(tok, dict) and tok.get("file") and (p / tok["file"]).is_file():
            return p / tok["file"]
    except Exception:
        pass
    return p / TOKENIZER_NAME if (p / TOKENIZER_NAME).is_file() else None


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What an evaluation records about a checkpoint (path, format, config, tokenizer, sleep settings)."""
    p = Path(path)
    fmt = detect_format(p)
    info: dict[str, Any] = {"path": str(p.resolve()), "format": fmt}
    if fmt == "megasleep":
        cfg, meta = read_config(p)
        info.update(config=cfg.model_dump(mode="json"), tokenizer=meta.get("tokenizer"), sleep=meta.get("sleep"),
                    source=meta.get("source"), megasleep_version=meta.get("megasleep_version"))
    else:
        info.update(mamba_ssm_config=_read_json(p / CONFIG_NAME))
    return info


__all__ = ["MissingCheckpointFileError", "PretrainedError", "UnsafeCheckpointError", "WeightsMismatchError",
           "build_from_state_dict", "checkpoint_info", "compare_state_dict", "detect_format", "from_pretrained",
           "load_pretrained", "load_weights", "read_config", "save_pretrained", "save_state_dict_pretrained",
           "tokenizer_path"]
