"""`megasleep retrofit`: turn a released model into a sleeping one without changing its function.

    megasleep retrofit --from DIR --insert gdn:after=3,7,11 --loop START:END --out DIR2
                       [--window 2000 --passes 4 --eviction hard]

* ``--insert KIND:after=i,j,...`` adds one SSM block (``gdn`` or ``mamba2``, no MLP) after each listed
  block of the source (indices of the source model). The new block's output projection is zero, so the
  retrofitted model computes exactly the source model's function until it is trained.
* ``--loop START:END`` (indices of the retrofitted stack, END exclusive) is the core that runs N times
  per window; blocks before it are the prelude, after it the coda (Jet-Nemotron's middle-block looping;
  ``0:`` loops the whole stack as for Ouro).
* The output is a megasleep export (config.json + model.safetensors, and the source's sentencepiece
  ``tokenizer.model`` when it has one) with the sleep settings recorded,
  plus ``model.yaml`` (its ModelConfig) for an experiment's ``model:`` and ``checkpoint.init_from``.

The source is any directory an adapter reads (a megasleep export, llama / qwen2, a hybrid ...).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import yaml

from megasleep.atomic import atomic_write
from megasleep.checkpoint.load import read_checkpoint
from megasleep.checkpoint.released import save_state_dict_pretrained, tokenizer_path
from megasleep.config import ConfigError, validate
from megasleep.models.config import ModelConfig

KINDS = {"gdn": "G", "mamba2": "M"}
ZERO_OUT = {"G": "o_proj", "M": "out_proj"}  # the projection that makes a new block a no-op when zero


def parse_insert(spec: str) -> tuple[str, list[int]]:
    """``gdn:after=3,7,11`` -> ("G", [3, 7, 11])."""
    kind, _, rest = spec.partition(":")
    if kind not in KINDS or not rest.startswith("after="):
        raise ConfigError(f"--insert {spec!r}: expected KIND:after=i,j,... with KIND in {sorted(KINDS)}")
    try:
        idx = sorted({int(x) for x in rest[len("after="):].split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--insert {spec!r}: block indices must be integers") from None
    return KINDS[kind], idx


def parse_loop(spec: str, n: int) -> tuple[int, int]:
    start, sep, end = spec.partition(":")
    try:
        s, e = int(start or 0), int(end) if end else n
    except ValueError:
        raise ConfigError(f"--loop {spec!r}: expected START:END (block indices of the retrofitted model)") from None
    if not sep or not 0 <= s < e <= n:
        raise ConfigError(f"--loop {spec!r}: need 0 <= START < END <= {n} (blocks of the retrofitted model)")
    return s, e


def retrofit_config(cfg: ModelConfig, letter: str, after: list[int], loop: str | None) -> tuple[ModelConfig, list]:
    """(new config, source index of every new block or None for an inserted one)."""
    n = len(cfg.pattern)
    bad = [i for i in after if not 0 <= i < n]
    if bad:
        raise ConfigError(f"--insert after={bad}: the source model has blocks 0..{n - 1}")
    if letter in cfg.pattern and after:
        raise ConfigError(f"the source already has {letter!r} blocks; inserted ones would share their MLP size "
                          f"(mlp.{letter}) - retrofit a model without {letter!r} blocks")
    origin: list = []
    for i in range(n):
        origin.append(i)
        if i in after:
            origin.append(None)
    pattern = "".join(cfg.pattern[o] if o is not None else letter for o in origin)
    start, end = parse_loop(loop, len(pattern)) if loop else (0, len(pattern))
    data = cfg.model_dump()
    data.update(pattern=pattern, n_prelude=start, n_coda=len(pattern) - end, name=f"{cfg.name}-retrofit")
    data["mlp"][letter] = 0.0  # inserted blocks have no MLP
    if letter == "G" and "A" in cfg.pattern:  # GDN heads shaped like the attention heads
        data["gdn"].update(n_heads=cfg.attn.n_heads, head_dim=cfg.attn_head_dim)
    return validate(ModelConfig, data, "retrofit"), origin


def retrofit_state(cfg: ModelConfig, state: dict[str, torch.Tensor], origin: list, seed: int = 0):
    """Source tensors moved to their new block indices; inserted blocks freshly initialised with a zero
    output projection."""
    from megasleep.models.hybrid import HybridLM

    torch.manual_seed(seed)
    fresh = HybridLM(cfg).state_dict()
    out = {k: v for k, v in state.items() if not k.startswith("layers.")}
    for new, old in enumerate(origin):
        prefix = f"layers.{new}."
        if old is None:
            for k, v in fresh.items():
                if k.startswith(prefix):
                    out[k] = torch.zeros_like(v) if k == f"{prefix}mixer.{ZERO_OUT[cfg.pattern[new]]}.weight" \
                        else v.clone()
        else:
            src = f"layers.{old}."
            out.update({prefix + k[len(src):]: v for k, v in state.items() if k.startswith(src)})
    return out


def retrofit(src: str | os.PathLike, out: str | os.PathLike, insert: str | None = None, loop: str | None = None,
             sleep: dict | None = None, seed: int = 0) -> Path:
    cfg, state, meta = read_checkpoint(src)
    letter, after = parse_insert(insert) if insert else ("G", [])
    new_cfg, origin = retrofit_config(cfg, letter, after, loop)
    new_state = retrofit_state(new_cfg, state, origin, seed)
    source = {"kind": "retrofit", "from": str(Path(src).resolve()), "format": meta.get("format"),
              "insert": insert, "loop": loop, "origin": origin}
    path = save_state_dict_pretrained(new_state, new_cfg, out, tokenizer_path(src), sleep=sleep or None,
                                      source=source)
    atomic_write(path / "model.yaml", yaml.safe_dump({"model": new_cfg.model_dump(mode="json")}, sort_keys=False))
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="src", required=True, help="source checkpoint directory (any supported format)")
    p.add_argument("--insert", default=None, help="KIND:after=i,j,... (KIND gdn | mamba2), source block indices")
    p.add_argument("--loop", default=None, help="START:END blocks of the retrofitted model that loop (default all)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--window", type=int, default=None, help="record the sleep window L")
    p.add_argument("--passes", type=int, default=None, help="record N")
    p.add_argument("--eviction", choices=["hard", "sliding"], default=None)
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of the inserted blocks")


def main(args) -> int:
    sleep = {k: getattr(args, k) for k in ("window", "passes", "eviction") if getattr(args, k) is not None}
    out = retrofit(args.src, args.out, args.insert, args.loop, sleep, args.seed)
    from megasleep.checkpoint.released import read_config

    cfg, meta = read_config(out)
    print(f"retrofitted {args.src} ({meta['source']['format']}) -> {out}: pattern {cfg.pattern}, "
          f"prelude {cfg.n_prelude}, core {len(cfg.pattern) - cfg.n_prelude - cfg.n_coda}, coda {cfg.n_coda}")
    return 0


__all__ = ["parse_insert", "parse_loop", "retrofit", "retrofit_config", "retrofit_state"]
