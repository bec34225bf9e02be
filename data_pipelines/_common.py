"""Shared helpers of the data_pipelines CLIs (argument parsing only; the work is in megasleep.data)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml


def parse_params(items: list[str] | None) -> dict:
    """``["n_max=50", "width=16"]`` -> {"n_max": 50, "width": 16} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--param {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def run_cli(main: Callable[[], object]) -> None:
    """Run a data CLI: progress messages on stderr (timestamped when it is not a terminal); a bad input
    (missing file, corrupt shard, bad value) ends in one line naming it and exit code 2, not a traceback."""
    from megasleep.cli import setup_console_logging
    from megasleep.data.errors import DataError

    setup_console_logging()
    try:
        main()
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
