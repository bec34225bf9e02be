"""`megasleep export`: a DeepSpeed training checkpoint (or a mamba_ssm checkpoint) -> HF-style directory.

    megasleep export RUN_DIR|CHECKPOINTS_DIR|TAG_DIR --out DIR [--tag step_00001000] [--config model.yaml]
                     [--tokenizer tok.model] [--dtype float32|bfloat16]
    megasleep export --from-mamba-ssm MAMBA_DIR --out DIR [--tokenizer tok.model]

DeepSpeed checkpoints: the weights are consolidated with DeepSpeed's own
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (ZeRO 1-3, any number of
ranks, fp32 master weights); a stage-0 checkpoint is read from its ``mp_rank_00_model_states.pt``. The
model config comes from the training marker ``<tag>/megasleep.json`` (``config.model``; the trainer
writes it, with ``config.sleep`` and the tokenizer path), or from ``--config`` (a model YAML, an
experiment YAML with a ``model:`` section, or a config.json). Every file of the checkpoint is first
verified weights-only (``megasleep.checkpoint.trust``; ``--trust-checkpoint`` skips that). Released
checkpoints are only ever read weights-only (``megasleep.models.pretrained``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

PREFIXES = ("module.", "model.", "_orig_mod.", "_forward_module.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="run dir, its checkpoints/ dir, or one tag dir (global_stepN / step_N)")
    p.add_argument("--from-mamba-ssm", default=None, metavar="DIR",
                   help="convert a mamba_ssm MambaLMHeadModel directory instead")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    p.add_argument("--config", default=None, help="model config (YAML / JSON) if the checkpoint has no marker")
    p.add_argument("--tokenizer", default=None, help="tokenizer .model to ship with the model")
    p.add_argument("--dtype", default=None, help="store weights as float32 (default) / bfloat16 / float16")
    p.add_argument("--window", type=int, default=None, help="record this training window L (if not in the marker)")
    p.add_argument("--passes", type=int, default=None, help="record this training N (if not in the marker)")
    p.add_argument("--eviction", choices=["hard", "sliding"], default=None)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint without the weights-only check (only if you trust its author)")


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (DeepSpeed ``module.``, a trainer's ``model.``, torch.compile's ``_orig_mod.``)."""
    changed = True
    while changed and state:
        changed = False
        for pre in PREFIXES:
            if all(k.startswith(pre) for k in state):
                state = {k[len(pre):]: v for k, v in state.items()}
                changed = True
    return state


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


def _model_config_from_file(path: Path):
    from megasleep.config import read_config_file
    from megasleep.models.config import load_model_config

    sleep = {} if path.suffix == ".json" else read_config_file(path).get("sleep") or {}
    return load_model_config(path), sleep


def read_training_checkpoint(ckpt_dir: Path, tag: str, config: str | None = None, trust: bool = False):
    """(state dict, ModelConfig, sleep dict, tokenizer path, provenance) of a DeepSpeed checkpoint."""
    from megasleep.checkpoint.trust import safe_load, verify_checkpoint
    from megasleep.config import validate
    from megasleep.models.config import ModelConfig

    tag_dir = ckpt_dir / tag
    marker = {}
    if (tag_dir / "megasleep.json").is_file():
        marker = json.loads((tag_dir / "megasleep.json").read_text())
    sleep: dict = {}
    if config is not None:
        cfg, sleep = _model_config_from_file(Path(config))
    elif isinstance((marker.get("config") or {}).get("model"), dict):
        cfg = validate(ModelConfig, marker["config"]["model"], f"{tag_dir / 'megasleep.json'}: config.model")
        sleep = marker["config"].get("sleep") or {}
    else:
        raise ValueError(f"{tag_dir}: no model config (no megasleep.json marker with config.model); "
                         f"pass --config MODEL.yaml")
    verify_checkpoint(tag_dir, trust)  # DeepSpeed's zero_to_fp32 unpickles without restrictions
    zero_files = list(tag_dir.glob("*zero_pp_rank_*optim_states.pt")) + list(tag_dir.glob("zero_pp_rank_*"))
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        how = "zero_to_fp32"
    else:
        f = tag_dir / "mp_rank_00_model_states.pt"
        if not f.is_file():
            raise FileNotFoundError(f"{tag_dir}: neither ZeRO shards nor mp_rank_00_model_states.pt")
        state = safe_load(f, trust)["module"]
        how = "model_states"
    state = strip_prefix({k: v for k, v in state.items()})
    tok = marker.get("tokenizer_path")
    source = {"kind": "deepspeed", "checkpoint": str(tag_dir.resolve()), "tag": tag, "step": marker.get("step"),
              "consolidation": how, "data": marker.get("data")}
    return state, cfg, sleep, (Path(tok) if tok else None), source


def main(args) -> int:
    from megasleep.models.pretrained import save_state_dict_pretrained

    if args.from_mamba_ssm:
        from megasleep.eval.mamba_import import convert

        cfg, state, report = convert(args.from_mamba_ssm)
        source = {"kind": "mamba_ssm", "path": str(Path(args.from_mamba_ssm).resolve()),
                  "vocab_size": report["vocab_size"], "padded_vocab_size": report["padded_vocab_size"],
                  "residual_in_fp32": report["residual_in_fp32"], "tensors": report["source_tensors"]}
        out = save_state_dict_pretrained(state, cfg, args.out, args.tokenizer, source=source, dtype=args.dtype)
        print(f"converted mamba_ssm checkpoint {args.from_mamba_ssm} ({report['source_tensors']} tensors, "
              f"pattern {cfg.pattern}) -> {out}")
        return 0
    if not args.checkpoint:
        raise ValueError("give a DeepSpeed checkpoint path or --from-mamba-ssm DIR")
    ckpt_dir, tag = resolve_checkpoint(args.checkpoint, args.tag)
    state, cfg, sleep, tok, source = read_training_checkpoint(ckpt_dir, tag, args.config, args.trust_checkpoint)
    tok = Path(args.tokenizer) if args.tokenizer else (tok if tok is not None and tok.is_file() else None)
    sleep = {k: v for k, v in dict(sleep or {}).items() if k in ("window", "passes", "eviction", "random_passes")}
    for k in ("window", "passes", "eviction"):
        if getattr(args, k) is not None:
            sleep[k] = getattr(args, k)
    out = save_state_dict_pretrained(state, cfg, args.out, tok, sleep=sleep or None, source=source,
                                     dtype=args.dtype or "float32")
    n = sum(v.numel() for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    print(f"exported {ckpt_dir / tag} ({source['consolidation']}, {n:,} parameters) -> {out}")
    return 0
