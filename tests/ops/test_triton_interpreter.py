"""The GPU kernel path without a GPU: mamba_ssm's and fla's Triton kernels under Triton's interpreter.

With ``TRITON_INTERPRET=1`` Triton executes its kernels on CPU tensors, in numpy. In a subprocess (the
variable must be set before mamba_ssm / fla are imported) this runs the CUDA test files themselves:

* ``tests/gpu/test_ops_cuda.py``: each kernel megasleep dispatches to (SSD chunk scan and decode
  step, GDN chunk forward and backward and decode step) against the torch chunked path, forward,
  backward and the initial-state gradient, fp32 and bf16, with document resets (SSD's ``seq_idx``,
  GDN's ``cu_seqlens`` layout) and ``backend="auto"``;
* ``tests/gpu/test_model_cuda.py``: the whole sleeping model (a prelude, Mamba-2, GDN and attention
  blocks, 2 passes, states carried across windows) through the kernels against the torch path:
  logits, states and every parameter's gradient;
* ``tests/inference/test_cuda.py``: the inference engine's wake steps through the decode kernels
  (``selective_state_update``, fla's fused recurrent rule) and its sleeps through the chunk kernels
  match the chunked forward's logits;
* ``tests/checkpoint/test_mamba_ssm.py::test_logits_agree_on_cuda``: mamba_ssm's own model with its
  own Triton kernels (SSD scan, gated RMSNorm, fused add+norm) and megasleep's import of its
  checkpoint through megasleep's kernel path give the same logits.

So the wrappers in ``megasleep/ops/*/cuda.py`` (argument layouts, reset encodings, dtypes, state
hand-off) are checked on every CPU run. Not covered here: the compiled ``causal_conv1d`` kernels, bf16
rounding as the GPU's tensor cores do it (emulated here: fp32 arithmetic rounded to bf16), the whole
model in bf16, and speed; those need a GPU (``benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.train.helpers import ROOT, env, pythonpath

pytestmark = pytest.mark.slow

# every test that must pass under the interpreter (parametrized ids stripped), and how many of each
MUST_PASS = {
    "test_kernel_report": 1,
    "test_ssd_cuda_vs_torch": 4,  # fp32 and bf16, with and without resets
    "test_ssd_step_cuda_vs_torch": 2,
    "test_gdn_cuda_vs_torch_forward": 4,
    "test_gdn_cuda_vs_torch": 8,
    "test_gdn_step_cuda_vs_torch": 4,
    "test_auto_backend_degrades_per_kernel": 1,
    "test_model_cuda_kernels_match_torch_path": 1,
    "test_cuda_engine_matches_chunked_forward_and_uses_step_kernels": 1,
    "test_logits_agree_on_cuda": 1,
}
# the only skips allowed, by reason: the compiled conv kernels, and a fallback fla needs only on Hopper
MAY_SKIP = {
    "test_conv_cuda_vs_torch": "CUDA is not available",
    "test_conv_step_cuda_vs_torch": "CUDA is not available",
    "test_gdn_training_falls_back_when_fla_backward_is_disabled": "nothing to fall back from",
}


def _missing() -> str | None:
    for mod in ("triton", "mamba_ssm", "fla"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (the interpreter runs its Triton kernels)"
    return None


@pytest.mark.skipif(_missing() is not None, reason=str(_missing()))
def test_gpu_kernel_tests_pass_under_the_triton_interpreter(tmp_path):
    report = tmp_path / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--junitxml={report}",
           "tests/gpu/test_ops_cuda.py", "tests/gpu/test_model_cuda.py", "tests/inference/test_cuda.py",
           "tests/checkpoint/test_mamba_ssm.py::test_logits_agree_on_cuda"]
    r = subprocess.run(cmd, cwd=ROOT, env=env(TRITON_INTERPRET="1", PYTHONPATH=pythonpath()),
                       capture_output=True, text=True, timeout=900)
    out = (r.stdout + r.stderr)[-6000:]
    assert r.returncode == 0, f"tests/gpu under TRITON_INTERPRET=1 failed (exit {r.returncode}):\n{out}"

    passed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = case.get("name", "").split("[")[0]
        skip = case.find("skipped")
        if skip is not None:
            skipped[name] = skip.get("message", "")
        elif case.find("failure") is None and case.find("error") is None:
            passed[name] = passed.get(name, 0) + 1
    for name, n in MUST_PASS.items():
        assert passed.get(name, 0) == n, f"{name}: {passed.get(name, 0)} passed, expected {n}\n{out}"
    for name, why in skipped.items():
        assert name in MAY_SKIP and MAY_SKIP[name] in why, f"unexpected skip of {name}: {why}"


def test_kernel_path_needs_cuda_or_the_interpreter(monkeypatch):
    """A CPU tensor reaches the kernels only once the interpreter is set up, not on TRITON_INTERPRET
    alone (the peers' host code fails on CPU tensors without the harness): "auto" stays on torch and
    "cuda" says what is missing."""
    from megasleep.ops import _peers, ssd
    from megasleep.ops._common import on_kernel_device
    from megasleep.ops.testing import enable_triton_interpreter, make_ssd_inputs

    x = torch.zeros(2, 3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _peers.triton_interpret_env() and not _peers.triton_interpreting() and not on_kernel_device(x)
    inp = make_ssd_inputs(1, 8, 2, 4, 1, 4, dtype=torch.float32)
    want = ssd(**inp, backend="torch")
    got = ssd(**inp, backend="auto")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            ssd(**inp, backend="cuda")
    monkeypatch.setattr(_peers, "_interpreter_ready", True)  # what enable_triton_interpreter() sets
    assert on_kernel_device(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_peers, "_interpreter_ready", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 before importing"):
        enable_triton_interpreter()
