"""Console logging of the ``megasleep`` logger (one home, used by the CLI and by the trainer's log lines)."""

from __future__ import annotations

import logging
import sys


def setup_console_logging(stream=None, level: int = logging.INFO) -> logging.Handler:
    """Messages of the ``megasleep`` logger go to ``stream`` (stderr): bare on a terminal, and with a UTC
    timestamp when the stream is not a terminal (a SLURM or CI log), where a line's time is otherwise lost.
    Idempotent: calling it again replaces the handler it installed."""
    import time

    stream = stream if stream is not None else sys.stderr
    logger = logging.getLogger("megasleep")
    for h in list(logger.handlers):
        if getattr(h, "_megasleep_console", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(stream)
    handler._megasleep_console = True  # type: ignore[attr-defined]
    isatty = getattr(stream, "isatty", lambda: False)()
    fmt = logging.Formatter("%(message)s" if isatty else "%(asctime)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ")
    fmt.converter = time.gmtime
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
