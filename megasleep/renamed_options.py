"""Command-line options that were renamed: the old spelling is refused with one line naming the new one.

Lists of sleep depths have their own name everywhere (``--eval-passes``: the N to evaluate at;
``--train-passes``: the N to train), while a single N is ``--passes``. A user who types an old flag
gets ``error: --sleep-passes: renamed --eval-passes (...)`` and exit code 2, instead of argparse's
"unrecognized arguments" or, worse, a flag that silently means something else.
"""

from __future__ import annotations

import argparse


def refuse_renamed(parser: argparse.ArgumentParser, old: str, new: str, meaning: str) -> None:
    """Make ``old`` a hidden option of ``parser`` whose use ends the parse with one line naming ``new``."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string}: renamed {new} ({meaning})")

    parser.add_argument(old, nargs="?", action=Renamed, help=argparse.SUPPRESS, dest=f"_renamed_{old.strip('-')}")
