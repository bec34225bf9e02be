"""CPU-side parts of benchmarks/gpu_check.{sh,py}: argument parsing, the table writer, a CPU smoke run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_parse_args_defaults_and_errors():
    a = gpu_check.parse_args([])
    assert a.models == ["350m", "1.3b"] and a.eval_passes == [1, 2, 4] and a.device == "cuda"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--eval-passes", "0"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--skip", "everything"])


def test_markdown_table():
    t = gpu_check.markdown_table(["a", "b"], [[1, 2.5], ["x", 12345.6]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.500 |", "| x | 12,346 |"]
    with pytest.raises(ValueError):
        gpu_check.markdown_table(["a"], [[1, 2]])


def test_peak_lookup():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("some cpu") is None


def test_cpu_smoke_run_prints_training_rows():
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--models", "tiny",
                        "--seq", "32", "--window", "8", "--steps", "1", "--eval-passes", "1", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2 and all(float(row.split("|")[4].replace(",", "")) > 0 for row in rows)


def test_report_names_the_commit():
    commit = gpu_check.git_commit()
    head = commit.split()[0]
    assert len(head) == 40 and int(head, 16) >= 0 or commit.startswith("unknown")


def test_shell_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_check.sh")], check=True)
