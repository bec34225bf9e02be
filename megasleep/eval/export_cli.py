"""`megasleep export`: a DeepSpeed training checkpoint, or any foreign checkpoint an adapter reads
(mamba_ssm, transformers' llama / qwen2 / mamba2 / bamba / granitemoehybrid / nemotron_h), -> a megasleep export directory.

    megasleep export RUN_DIR|CHECKPOINTS_DIR|TAG_DIR --out DIR [--tag step_00001000] [--config model.yaml]
                     [--tokenizer tok.model] [--dtype float32|bfloat16]
    megasleep export --from-mamba-ssm MAMBA_DIR --out DIR [--tokenizer tok.model]
    megasleep export --from-released HF_DIR --out DIR

The formats live in ``megasleep.checkpoint`` (docs/checkpoint.md, docs/released.md); this module is the
command line only. Every file of a DeepSpeed checkpoint is first verified weights-only
(``megasleep.checkpoint.trust``; ``--trust-checkpoint`` skips that).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="run dir, its checkpoints/ dir, or one tag dir (global_stepN / step_N)")
    p.add_argument("--from-mamba-ssm", "--from-released", dest="from_released", default=None, metavar="DIR",
                   help="convert a foreign checkpoint directory (mamba_ssm, or a transformers family) instead")
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


def main(args) -> int:
    from megasleep.checkpoint.deepspeed import read_training_checkpoint, resolve_checkpoint
    from megasleep.checkpoint.load import read_checkpoint
    from megasleep.checkpoint.released import save_state_dict_pretrained

    sleep_args = {k: getattr(args, k) for k in ("window", "passes", "eviction") if getattr(args, k) is not None}
    if args.from_released:
        cfg, state, meta = read_checkpoint(args.from_released)
        report = meta.get("import") or {}
        source = {**(meta.get("source") or {}), **{k: report[k] for k in ("vocab_size", "padded_vocab_size",
                                                                           "residual_in_fp32") if k in report},
                  "tensors": report.get("source_tensors", len(state))}
        out = save_state_dict_pretrained(state, cfg, args.out, args.tokenizer, source=source, dtype=args.dtype,
                                         sleep=sleep_args or None)
        print(f"converted {meta['format']} checkpoint {args.from_released} ({source['tensors']} tensors, "
              f"pattern {cfg.pattern}) -> {out}")
        return 0
    if not args.checkpoint:
        raise ValueError("give a DeepSpeed checkpoint path or --from-released DIR")
    ckpt_dir, tag = resolve_checkpoint(args.checkpoint, args.tag)
    state, cfg, sleep, tok, source = read_training_checkpoint(ckpt_dir, tag, args.config, args.trust_checkpoint)
    tok = Path(args.tokenizer) if args.tokenizer else (tok if tok is not None and tok.is_file() else None)
    sleep = {**sleep, **sleep_args}
    out = save_state_dict_pretrained(state, cfg, args.out, tok, sleep=sleep or None, source=source,
                                     dtype=args.dtype or "float32")
    n = sum(v.numel() for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight"))
    print(f"exported {ckpt_dir / tag} ({source['consolidation']}, {n:,} parameters) -> {out}")
    return 0
