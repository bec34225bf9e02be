"""launch/wheelhouse.sh: the dependencies of megasleep for a GPU node with no package index whose Python
already has torch. The closure check (launch/wheelhouse_check.py) runs on synthetic wheels here; the
whole build, the offline install and benchmarks/gpu_check.sh's WHEELHOUSE path need PyPI and run with
MEGASLEEP_RESOLVE_IMAGE=1, like the image's resolution."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile

import pytest

from tests.train.helpers import ROOT
from tests.train.test_dockerfile import opt_in_online

spec = importlib.util.spec_from_file_location("wheelhouse_check", ROOT / "launch" / "wheelhouse_check.py")
wheelhouse_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse_check)


def fake_wheel(house, name: str, *requires: str):
    with zipfile.ZipFile(house / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA", "\n".join(
            ["Metadata-Version: 2.1", f"Name: {name}", "Version: 1.0", *(f"Requires-Dist: {r}" for r in requires)]))


def test_closure_check_names_each_gap_and_who_needs_it(tmp_path):
    house = tmp_path / "house"
    house.mkdir()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.4", "Pydantic>=1", "webdataset==1.0"]\n')
    fake_wheel(house, "pydantic", "pydantic-core==1.0", "typing_extensions>=4")
    fake_wheel(house, "webdataset", "braceexpand", "numpy", 'tomli; python_version < "3.11"', 'foo; extra == "dev"')

    def gaps(version, node_has=("torch", "numpy", "typing-extensions")):
        return wheelhouse_check.missing(house, version, list(node_has), [], pyproject=pyproject)

    assert gaps("3.12") == ["braceexpand (needed by webdataset-1.0-py3-none-any.whl)",
                            "pydantic-core (needed by pydantic-1.0-py3-none-any.whl)"]
    assert "tomli (needed by webdataset-1.0-py3-none-any.whl)" in gaps("3.10")  # markers are the node's
    assert gaps("3.12", node_has=("numpy", "typing-extensions", "braceexpand", "pydantic-core")) == [
        "torch (needed by pyproject.toml)"]
    fake_wheel(house, "pydantic_core")
    fake_wheel(house, "braceexpand")
    assert gaps("3.12") == []
    # a pin that moved in pyproject.toml but not in the house (every fake wheel is version 1.0)
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch", "webdataset==1.0.3"]\n')
    assert gaps("3.12") == ["webdataset 1.0 in the house, not ==1.0.3 (needed by pyproject.toml)"]
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch", "webdataset==1.0"]\n')
    (house / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile):
        gaps("3.12")


def test_the_scripts_parse():
    for script in ("launch/wheelhouse.sh", "benchmarks/gpu_check.sh"):
        subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


@opt_in_online("downloads from PyPI and builds three wheels")
def test_wheelhouse_builds_installs_offline_and_feeds_gpu_check(tmp_path):
    house = tmp_path / "house"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run(["bash", "launch/wheelhouse.sh", str(house), version], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    names = {w.name.split("-")[0] for w in house.glob("*.whl")}
    assert {"deepspeed", "mamba_ssm", "causal_conv1d", "fla_core", "webdataset", "pydantic", "pydantic_core"} <= names
    # benchmarks/gpu_check.sh installs it offline and runs with it (its CPU smoke sizes here)
    out = tmp_path / "check.md"
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--device", "cpu", "--models", "tiny", "--seq",
                        "32", "--window", "8", "--steps", "1", "--eval-passes", "1"],
                       cwd=ROOT, env={**env, "WHEELHOUSE": str(house), "TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    site = tmp_path / "megasleep-site"
    assert {"deepspeed", "mamba_ssm", "fla", "webdataset", "pydantic"} <= {d.name for d in site.iterdir()}
    assert "| tiny | 1 |" in p.stdout  # (on a CPU the tables go to stdout; the report holds the tests' tail)
    assert "CUDA parity tests (exit 0)" in out.read_text()
