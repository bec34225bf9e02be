"""`megasleep` command line. Start-up stays fast: every subcommand imports its package lazily.

Each subcommand lives in the package that owns it, as a module exposing ``add_arguments(parser)`` and
``main(args) -> int``; this file only lists them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megasleep.console import setup_console_logging

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "model-info": ("megasleep.models.info", "parameter count and shape summary of a model config"),
    "demo": ("megasleep.demo", "the main job: small sleeping-model pretraining + evaluation on CPU"),
    "train": ("megasleep.train.cli", "train with DeepSpeed from an experiment YAML"),
    "generate": ("megasleep.inference.cli", "stream tokens from a checkpoint with wake/sleep decoding"),
    "eval": ("megasleep.eval.cli", "evaluate a checkpoint at several sleep depths"),
    "export": ("megasleep.eval.export_cli", "DeepSpeed checkpoint -> HF-style directory"),
    "retrofit": ("megasleep.checkpoint.retrofit", "insert SSM blocks into a released model and choose the loop"),
    "study": ("megasleep.study.cli", "train one experiment at several N and seeds, tables with intervals"),
    "data": ("megasleep.data.cli", "a folder of text -> tokenizer + shards + experiment config; verify datasets"),
    "plan": ("megasleep.plan", "per-GPU memory, batch/world checks and FLOPs of a config on K nodes x G GPUs"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    from megasleep import __version__

    parser = argparse.ArgumentParser(prog="megasleep", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megasleep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, object] = {}
    wanted = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command pays for its imports
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("megasleep"):
                    p.set_defaults(_missing=f"`megasleep {name}` is not available in this build ({exc.name})")
                    continue
                raise
            mod.add_arguments(p)
            modules[name] = mod
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    parser, modules = build_parser()
    args = parser.parse_args()
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    setup_console_logging()
    from megasleep.config import ConfigError
    from megasleep.data.errors import DataError

    try:
        return int(modules[args.command].main(args) or 0)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"megasleep {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
