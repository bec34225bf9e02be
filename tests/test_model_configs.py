"""Every config in configs/models instantiates on the meta device within 10% of its target (docs/sleep.md#model-sizes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megasleep.models import load_model_config
from megasleep.models.info import TARGET_PARAMS, count
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs" / "models").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_param_count_matches_spec(path):
    cfg = load_model_config(path)
    n = count(cfg)["total"]
    target = TARGET_PARAMS[cfg.name]
    if cfg.name.startswith("tiny"):
        assert n < target, f"{path.name}: {n:,} parameters, target < {target:,.0f}"
    else:
        assert abs(n / target - 1) <= 0.10, f"{path.name}: {n:,} parameters vs target ~{target:,.0f}"


def test_model_info_cli_prints_counts():
    out = subprocess.run([sys.executable, "-m", "megasleep.cli", "model-info", *map(str, CONFIGS)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for p in CONFIGS:
        assert str(p) in out
    assert "per mixer" in out


def test_model_info_cli_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vocab_size: 10\nd_model: 64\npattern: AQ\n")
    r = subprocess.run([sys.executable, "-m", "megasleep.cli", "model-info", str(bad)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and str(bad) in r.stderr and "pattern" in r.stderr and "Traceback" not in r.stderr
