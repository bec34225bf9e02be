"""lm-evaluation-harness's command line with the ``megasleep`` model registered.

    python -m megasleep.eval.lm_eval_cli --model megasleep \\
        --model_args pretrained=DIR,passes=4,window=2048,eviction=hard --tasks hellaswag

Every argument is lm_eval's own (``run`` / ``ls`` / ``validate`` subcommands and the legacy form
without one). lm_eval 0.4.13 finds models only in its registry and does not load plugins through
entry points, so a plain ``lm_eval --model megasleep`` cannot see us; this wrapper registers the model
(by importing :mod:`megasleep.eval.lm_eval_adapter`) and then hands over to ``lm_eval``'s ``HarnessCLI``.

lm_eval's ``--device`` defaults to ``cuda:0`` and is written into the results JSON; on a machine
without CUDA, a run that names no device gets ``--device cpu``, so the record says what was used.
A bad ``model_args`` (unknown key, CUDA requested without CUDA) ends in one line and exit code 2.
"""

from __future__ import annotations

import sys


def _with_device(argv: list[str], cuda: bool) -> list[str]:
    """``argv`` plus ``--device cpu`` when it runs an evaluation naming no device on a machine without CUDA."""
    runs = any(a == "--model" or a.startswith("--model=") for a in argv) and not (argv and argv[0] in ("ls",
                                                                                                        "validate"))
    named = any(a == "--device" or a.startswith("--device=") for a in argv)
    if "--config" in argv or any(a.startswith("--config=") for a in argv):
        named = True  # a YAML config may set the device itself; leave it to lm_eval
    return [*argv, "--device", "cpu"] if runs and not named and not cuda else list(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    import megasleep.eval.lm_eval_adapter  # noqa: F401  (registers model "megasleep")

    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *_with_device(argv, torch.cuda.is_available())]
    try:  # lm_eval >= 0.4.10: subcommand CLI
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:  # older 0.4.x: one flat parser
        from lm_eval.__main__ import cli_evaluate

        cli_evaluate()
        return 0
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    try:
        parser.execute(args)
    except ValueError as exc:
        if "megasleep lm_eval model" not in str(exc):
            raise
        print(f"megasleep-lm-eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
