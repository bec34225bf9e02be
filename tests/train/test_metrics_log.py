"""Log lines where no progress bar is drawn (SLURM / CI logs): timestamped, with step / total and ETA."""

from __future__ import annotations

import re
from types import SimpleNamespace

from megasleep.train.metrics import MetricLogger


def test_non_tty_step_lines_carry_time_step_total_and_eta(tmp_path, capsys):
    from megasleep.console import setup_console_logging

    setup_console_logging()  # bind the console handler to this test's (captured, non-terminal) stderr
    cfg = SimpleNamespace(jsonl=False, tensorboard=False, progress=True,
                          wandb=SimpleNamespace(enabled=False, mode="disabled"))
    log = MetricLogger(tmp_path, cfg, enabled=True, total_steps=10, start_step=0)
    log.t_start -= 4.0  # 4 s for the first 2 steps -> 16 s for the 8 left
    log.log(2, {"loss": 1.5, "lr": 1e-3})
    log.write("[megasleep] a message")
    lines = capsys.readouterr().err.strip().splitlines()
    stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ "
    assert re.match(stamp + r"\[step 2/10 eta 0m1[5-7]s\] loss 1\.5000", lines[0]), lines
    assert re.match(stamp + r"\[megasleep\] a message$", lines[1]), lines
    log.close()
