"""`megasleep train [CONFIG] [key=value ...]`: train from an experiment YAML (default: the tiny demo).

Run it under any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR (torchrun, the deepspeed launcher,
srun via launch/pretrain.sh), or with plain python for one process. Other modes:

    megasleep train CONFIG --print-config          resolved config (model inlined), then exit
    megasleep train CONFIG --eval-only             evaluate the run's latest checkpoint at eval.passes

(`megasleep export RUN_DIR --out DIR` consolidates any saved checkpoint into an HF-style directory.)
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (default: configs/experiments/tiny-demo.yaml); key=value items "
                        "here count as overrides")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. sleep.passes=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-run-dir", action="store_true", help="print the run directory and exit")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the run's latest checkpoint at eval.passes (writes eval.json) and exit")


def main(args) -> int:
    from megasleep.train.config import load_experiment

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    cfg = load_experiment(config, overrides)
    if args.print_config:
        from megasleep.train.config import dump_yaml

        print(dump_yaml(cfg), end="")
        return 0
    if args.print_run_dir:
        print(cfg.run_path)
        return 0
    from megasleep.data.errors import DataError
    from megasleep.train.checkpoint import CheckpointError
    from megasleep.train.trainer import run

    try:
        return run(cfg, eval_only=args.eval_only)
    except (CheckpointError, DataError) as exc:
        print(f"megasleep train: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # python -m megasleep.train.cli (what launch/pretrain.sh runs under torchrun)
    parser = argparse.ArgumentParser(prog="megasleep train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    from megasleep.config import ConfigError

    try:
        sys.exit(main(parser.parse_args()))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"megasleep train: error: {exc}", file=sys.stderr)
        sys.exit(2)
