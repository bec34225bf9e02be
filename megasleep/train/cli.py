"""`megasleep train [CONFIG] [key=value ...]`: train from an experiment YAML (default: the tiny demo).

Run it under any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR (torchrun, the deepspeed launcher,
srun via launch/pretrain.sh), or with plain python for one process. Other modes:

    megasleep train CONFIG --print-config          resolved config (model inlined), then exit
    megasleep train CONFIG --check-only --world-size W
                                                   every check a run at W ranks makes before starting
                                                   (paths, DeepSpeed JSON, batch / world divisibility):
                                                   exit 0, or exit 2 with one line on stderr
    megasleep train CONFIG --eval-only             evaluate the run's latest checkpoint at eval.eval_passes

(`megasleep export RUN_DIR --out DIR` consolidates any saved checkpoint into an HF-style directory.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# "module:Class" of a Trainer subclass to run instead of the Trainer (tests use it to inject faults)
TRAINER_ENV = "MEGASLEEP_TRAINER"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None,
                   help="experiment YAML (default: configs/experiments/tiny-demo.yaml); key=value items "
                        "here count as overrides")
    p.add_argument("overrides", nargs="*", default=[], help="dotted key=value overrides, e.g. sleep.passes=2")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--print-run-dir", action="store_true", help="print the run directory and exit")
    p.add_argument("--check-only", action="store_true",
                   help="validate the config for --world-size ranks (paths, DeepSpeed JSON, batch split) and exit")
    p.add_argument("--world-size", type=int, default=None, metavar="W",
                   help="ranks the run will have (with --check-only; default: $WORLD_SIZE, else 1)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the run's latest checkpoint at eval.eval_passes (writes eval.json) and exit")
    # `deepspeed --module megasleep.train.cli` appends --local_rank=N (LOCAL_RANK in the environment says the same)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load checkpoint files without the weights-only check (= checkpoint.trust=true)")


def trainer_class():
    from megasleep.train.trainer import Trainer

    spec = os.environ.get(TRAINER_ENV)
    if not spec:
        return Trainer
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, Trainer)):
        raise ValueError(f"{TRAINER_ENV}={spec}: not a megasleep Trainer subclass (expected module:Class)")
    return cls


def run(cfg, eval_only: bool = False, trainer_cls=None) -> int:
    """Train; the process exit status: 0 done or cleanly stopped (status.json tells which), 3 failed.
    Any other exception propagates after status.json says ``failed``."""
    from megasleep.train.checkpoint import CheckpointError
    from megasleep.train.distributed import shutdown_distributed
    from megasleep.train.trainer import TrainingFailed

    trainer_cls = trainer_cls or trainer_class()
    trainer = None
    ok = False
    try:
        if eval_only:
            cfg = cfg.model_copy(deep=True)
            cfg.checkpoint.resume = "auto" if cfg.checkpoint.resume == "never" else cfg.checkpoint.resume
            trainer = trainer_cls(cfg, eval_only=True)
            if trainer.resumed_from is None:
                raise CheckpointError(f"--eval-only: no complete checkpoint in {trainer.ckpt_dir}")
            res = trainer.evaluate()
            if trainer.rank == 0:
                (trainer.run_dir / "eval.json").write_text(
                    json.dumps({"step": trainer.step, "checkpoint": trainer.resumed_from, "results": res}, indent=1))
            ok = True
            return 0
        trainer = trainer_cls(cfg)
        trainer.train()
        ok = True
        return 0
    except TrainingFailed as exc:
        print(f"[megasleep] training failed: {exc}", file=sys.stderr, flush=True)
        ok = True  # every rank reaches this together: a clean shutdown is still possible
        return 3
    except BaseException as exc:
        if trainer is not None:
            trainer.status.fail(exc)  # (a failure inside Trainer() already wrote it)
        raise
    finally:
        if trainer is not None:
            trainer.close() if ok else shutdown_distributed(barrier=False)
        else:
            shutdown_distributed(barrier=False)


def main(args) -> int:
    from megasleep.config import ConfigError
    from megasleep.train.config import load_experiment
    from megasleep.train.distributed import launcher_world_size

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:
        config, overrides = None, [config, *overrides]
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if getattr(args, "trust_checkpoint", False):
        overrides.append("checkpoint.trust=true")
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

    if args.check_only:
        from megasleep.train.preflight import preflight

        world = args.world_size if args.world_size is not None else launcher_world_size()
        try:
            preflight(cfg, world)
        except (ConfigError, CheckpointError, DataError, FileNotFoundError) as exc:
            where = "" if f"world size {world}" in str(exc) else f" (checked for world size {world})"
            print(f"megasleep train: error: {exc}{where}", file=sys.stderr)
            return 2
        print(f"megasleep train: {cfg.source}: ok for world size {world}", file=sys.stderr)
        return 0
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
