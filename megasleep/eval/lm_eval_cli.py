"""lm-evaluation-harness's command line with the ``megasleep`` model registered.

    python -m megasleep.eval.lm_eval_cli --model megasleep \\
        --model_args pretrained=DIR,sleep_passes=4,window=2048,eviction=hard --tasks hellaswag

Every argument is lm_eval's own (``run`` / ``ls`` / ``validate`` subcommands and the legacy form
without one). lm_eval 0.4.13 finds models only in its registry and does not load plugins through
entry points, so a plain ``lm_eval --model megasleep`` cannot see us; this wrapper registers the model
(by importing :mod:`megasleep.eval.lm_eval_adapter`) and then hands over to ``lm_eval``'s ``HarnessCLI``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import megasleep.eval.lm_eval_adapter  # noqa: F401  (registers model "megasleep")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
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
    parser.execute(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
