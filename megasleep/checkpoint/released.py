"""The released format: a Hugging-Face-style directory megasleep writes and reads natively::

    <dir>/config.json         the ModelConfig fields at top level (``ModelConfig.model_dump()``) plus
                              "model_type": "megasleep", "format_version", "megasleep_version",
                              "torch_dtype", "tied_weights" {alias: stored name}, and optional
                              "tokenizer" {file, hash, vocab_size, ...}, "sleep" (the sleep settings the
                              model was trained with: window, passes, eviction), "source" (provenance)
    <dir>/model.safetensors   the weights under HybridLM state-dict names (sharded with an index when
                              large); a tied tensor is stored once and re-tied on load
    <dir>/tokenizer.model     the sentencepiece model, when there is one

Loading is strict: every tensor the config implies must be there with the right shape and nothing else
may be (the error names the tensors). Foreign formats are converted by the adapters in
``megasleep.checkpoint.adapters``; :func:`megasleep.checkpoint.load.load_pretrained` picks one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megasleep.checkpoint.errors import MissingCheckpointFileError, PretrainedError, WeightsMismatchError
from megasleep.checkpoint.weights import (
    CONFIG_NAME,
    dtype_name,
    load_weights,
    parse_dtype,
    read_json,
    replace_dir,
    save_weights,
    temp_dir_for,
)
from megasleep.models.config import ModelConfig

FORMAT_VERSION = 1
MODEL_TYPE = "megasleep"
TOKENIZER_NAME = "tokenizer.model"


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


def config_dict(cfg: ModelConfig, **meta) -> dict:
    """config.json content of an export: ModelConfig fields + the format's metadata."""
    data = cfg.model_dump(mode="json")
    data.update({"model_type": MODEL_TYPE, "architectures": ["MegasleepForCausalLM"],
                 "format_version": FORMAT_VERSION, "megasleep_version": _version()})
    data.update(meta)
    return data


def save_state_dict_pretrained(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike,
                               tokenizer_path: str | os.PathLike | None = None, *, sleep: dict | None = None,
                               source: dict | None = None, dtype=None, tied_weights: dict[str, str] | None = None,
                               check: bool = True, max_shard_size: int | str = "5GB") -> Path:
    """Write a state dict (HybridLM names) + config as an exported directory, atomically.

    ``tied_weights`` {alias: name}: aliases are dropped (found automatically for shared tensors; with
    ``cfg.tie_embeddings`` ``lm_head.weight`` is always an alias of ``embed_tokens.weight``).
    ``check`` validates names and shapes against ``cfg`` before anything is written. Weights larger than
    ``max_shard_size`` are written as shards with a ``model.safetensors.index.json``.
    """
    out = Path(out_dir)
    tensors, tied = _dedup_tied(dict(state))
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
        raise_on_mismatch(cfg, full, where=str(out))
    target = parse_dtype(dtype)
    cpu: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        v = v.detach()
        if target is not None and v.is_floating_point():
            v = v.to(target)
        cpu[k] = v.to("cpu").contiguous()
    stored = {v.dtype for v in cpu.values()}
    tok_path = None
    if tokenizer_path is not None:
        tok_path = Path(tokenizer_path)
        if not tok_path.is_file() and Path(str(tok_path) + ".model").is_file():
            tok_path = Path(str(tok_path) + ".model")
        if not tok_path.is_file():
            raise MissingCheckpointFileError(f"tokenizer file not found: {tok_path}")
    meta = config_dict(cfg, torch_dtype=dtype_name(next(iter(stored))) if len(stored) == 1 else "mixed",
                       tied_weights=dict(sorted(tied.items())),
                       tokenizer=_tokenizer_info(tok_path) if tok_path else None, sleep=sleep, source=source)
    tmp = temp_dir_for(out)
    try:
        save_weights(cpu, tmp, max_shard_size=max_shard_size)
        if tok_path is not None:
            shutil.copyfile(tok_path, tmp / TOKENIZER_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_pretrained(model, out_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None, *,
                    sleep=None, source: dict | None = None, dtype=None, max_shard_size: int | str = "5GB") -> Path:
    """Export ``model`` (a HybridLM) to ``out_dir`` (config.json + model.safetensors [+ tokenizer.model]).

    ``sleep``: a SleepConfig or dict recorded as the model's training sleep settings (eval defaults).
    ``dtype``: store floating tensors in this dtype (default: as they are)."""
    if sleep is not None and hasattr(sleep, "model_dump"):
        sleep = sleep.model_dump(mode="json")
    return save_state_dict_pretrained(model.state_dict(), model.config, out_dir, tokenizer_path, sleep=sleep,
                                      source=source, dtype=dtype, check=False, max_shard_size=max_shard_size)


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
def is_megasleep_config(raw: dict) -> bool:
    return raw.get("model_type") == MODEL_TYPE or {"vocab_size", "d_model", "pattern"} <= set(raw)


def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, metadata) of a megasleep export directory (metadata = the non-model keys)."""
    from megasleep.models.config import load_model_config

    p = Path(path)
    raw = read_json(p / CONFIG_NAME)
    cfg = load_model_config(p / CONFIG_NAME)
    meta = {k: v for k, v in raw.items() if k not in ModelConfig.model_fields}
    return cfg, meta


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


def raise_on_mismatch(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> None:
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
    raise_on_mismatch(cfg, state, where)
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


def resolve_dtype(dtype, state: dict[str, torch.Tensor]) -> torch.dtype:
    """None -> float32; "auto" -> the stored floating dtype (float32 when mixed); else parsed."""
    if dtype == "auto":
        stored = {v.dtype for v in state.values() if v.is_floating_point()}
        return next(iter(stored)) if len(stored) == 1 else torch.float32
    return parse_dtype(dtype) or torch.float32


def read_native(p: Path, overrides: dict) -> tuple[ModelConfig, dict[str, torch.Tensor], dict]:
    """(ModelConfig, state, metadata) of a megasleep export; ``overrides`` change shape-free fields."""
    cfg, meta = read_config(p)
    if overrides:
        from megasleep.config import validate

        cfg = validate(ModelConfig, {**cfg.model_dump(), **overrides}, f"{p / CONFIG_NAME} (with overrides)")
    state = load_weights(p)
    for alias, name in (meta.get("tied_weights") or {}).items():
        if alias not in state and name in state:
            state[alias] = state[name]
    tok = meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("file") and not (p / tok["file"]).is_file():
        raise MissingCheckpointFileError(f"{p}: config.json names tokenizer file {tok['file']!r} but it is missing")
    return cfg, state, meta


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The tokenizer file of a checkpoint directory, if it has one."""
    p = Path(path)
    try:
        _, meta = read_config(p)
        tok = meta.get("tokenizer")
        if isinstance(tok, dict) and tok.get("file") and (p / tok["file"]).is_file():
            return p / tok["file"]
    except (PretrainedError, ValueError, OSError):
        pass
    return p / TOKENIZER_NAME if (p / TOKENIZER_NAME).is_file() else None


__all__ = ["FORMAT_VERSION", "MODEL_TYPE", "TOKENIZER_NAME", "build_from_state_dict", "compare_state_dict",
           "config_dict", "expected_shapes", "is_megasleep_config", "raise_on_mismatch", "read_config",
           "read_native", "resolve_dtype", "save_pretrained", "save_state_dict_pretrained", "tokenizer_path"]
