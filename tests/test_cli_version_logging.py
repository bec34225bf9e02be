"""`megasleep --version`, and console log lines timestamped when stderr is not a terminal (SLURM logs)."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys

import megasleep
from megasleep.console import setup_console_logging


def test_version():
    r = subprocess.run([sys.executable, "-m", "megasleep.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"megasleep {megasleep.__version__}"


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_log_lines_get_a_utc_timestamp_only_off_a_terminal():
    log = logging.getLogger("megasleep.data.corpus")
    pipe, tty = io.StringIO(), _Tty()
    try:
        setup_console_logging(pipe)
        log.info("corpus: read 3 files")
        setup_console_logging(tty)  # replaces the handler: one line per message, not two
        log.info("corpus: read 4 files")
    finally:
        setup_console_logging()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ corpus: read 3 files\n", pipe.getvalue())
    assert tty.getvalue() == "corpus: read 4 files\n"
