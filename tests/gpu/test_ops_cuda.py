"""CUDA kernels vs the chunked PyTorch path: forward and backward (incl. the initial-state
gradient), fp32 and bf16, with and without document resets; the decode-step kernels; and the
graceful fallback of ``backend="auto"`` when a kernel is missing.

Each test skips with the reason when CUDA or its kernel is absent (mamba_ssm's Triton SSD kernels,
causal_conv1d's compiled extension, fla's Triton kernels). Run: ``pytest -q -ra tests/gpu/test_ops_cuda.py``.
With ``TRITON_INTERPRET=1`` the Triton kernels run on CPU tensors under Triton's interpreter (the
compiled conv kernels skip): ``tests/ops/test_triton_interpreter.py`` runs this file that way.
"""

import pytest
import torch

from megasleep.ops import (
    _peers,
    causal_conv1d,
    causal_conv1d_step,
    gated_delta_rule,
    gdn_step,
    ssd,
    ssd_step,
)
from megasleep.ops.testing import (
    assert_all_close,
    kernel_test_device,
    make_conv_inputs,
    make_gdn_inputs,
    make_ssd_inputs,
    random_reset,
    run_with_grads,
)

pytestmark = pytest.mark.gpu
DEV = kernel_test_device()
# |err| <= atol + rtol * max|ref|, per tensor. fp32: the Triton kernels use TF32 matmuls.
TOL = {torch.float32: dict(atol=1e-3, rtol=1e-2), torch.bfloat16: dict(atol=1e-2, rtol=5e-2)}
INTERPRETED = DEV == "cpu"
# The interpreter executes every program instance in numpy, so there the shapes shrink (still several
# chunks, a partial last chunk, groups shared by heads, B > 1).
DTYPES = [torch.float32, torch.bfloat16]
T = 100 if INTERPRETED else 300
SSD_HPGN = (4, 16, 2, 16) if INTERPRETED else (8, 64, 2, 64)  # heads, head dim, groups, state dim
GDN_HKV = (2, 32, 32) if INTERPRETED else (4, 64, 64)  # heads, key dim, value dim


def need(getter):
    fn, why = getter()
    if fn is None:
        pytest.skip(why)
    return fn


def test_kernel_report(capsys):
    """Not a check: prints which kernels dispatch here (shown with -s or in the -ra summary)."""
    rep = _peers.kernel_report()
    with capsys.disabled():
        print("\nmegasleep.ops kernel report:")
        for k, v in rep.items():
            print(f"  {k:34s} {v}")


# ------------------------------------------------------------------------------------ SSD
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_ssd_cuda_vs_torch(dtype, with_reset):
    need(_peers.mamba_chunk_scan_combined)
    b, t = 2, T
    inp = make_ssd_inputs(b, t, *SSD_HPGN, dtype=dtype, device=DEV, seed=1)
    reset = random_reset(b, t, p=0.01, seed=2, device=DEV) if with_reset else None
    ref = run_with_grads(ssd, inp, reset=reset, backend="torch", chunk_size=64)
    test = run_with_grads(ssd, inp, reset=reset, backend="cuda", chunk_size=64)
    assert test[0].dtype == dtype and test[1].dtype == torch.float32
    assert_all_close(ref, test, **TOL[dtype], what=f"ssd cuda vs torch {dtype} reset={with_reset}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ssd_step_cuda_vs_torch(dtype):
    need(_peers.selective_state_update)
    inp = make_ssd_inputs(3, 1, *SSD_HPGN, dtype=dtype, device=DEV, seed=3)
    S0 = inp["initial_state"]
    S0_before = S0.clone()
    args = (inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0], inp["D"], S0)
    y_ref, S_ref = ssd_step(*args, backend="torch")
    y, S = ssd_step(*args, backend="cuda")
    assert y.dtype == dtype and S.dtype == torch.float32
    assert_all_close((y_ref, S_ref, {}), (y, S, {}), **TOL[dtype], what=f"ssd_step {dtype}")
    assert torch.equal(S0, S0_before)  # the kernel updates a copy, not the caller's state


# ------------------------------------------------------------------------------------ GDN
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_gdn_cuda_vs_torch_forward(dtype, with_reset):
    """Forward only (what inference uses); resets go through fla's varlen ``cu_seqlens`` path."""
    need(_peers.fla_chunk_gated_delta_rule)
    b, t = 2, T
    inp = make_gdn_inputs(b, t, *GDN_HKV, dtype=dtype, device=DEV, seed=4)
    reset = random_reset(b, t, p=0.01, seed=5, device=DEV) if with_reset else None
    with torch.no_grad():
        ref = gated_delta_rule(**inp, reset=reset, backend="torch")
        test = gated_delta_rule(**inp, reset=reset, backend="cuda")
    assert test[0].dtype == dtype and test[1].dtype == torch.float32
    assert_all_close((*ref, {}), (*test, {}), **TOL[dtype], what=f"gdn fwd cuda vs torch {dtype} reset={with_reset}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
@pytest.mark.parametrize("beta_max", [1.0, 2.0], ids=["beta1", "beta2"])  # 2: gdn.allow_neg_eigval
def test_gdn_cuda_vs_torch(dtype, with_reset, beta_max):
    need(_peers.fla_chunk_gated_delta_rule)
    if (why := _peers.fla_gdn_backward_problem()) is not None:
        pytest.skip(why)
    b, t = 2, T
    inp = make_gdn_inputs(b, t, *GDN_HKV, dtype=dtype, device=DEV, seed=4, beta_max=beta_max)
    reset = random_reset(b, t, p=0.01, seed=5, device=DEV) if with_reset else None
    ref = run_with_grads(gated_delta_rule, inp, reset=reset, backend="torch")
    test = run_with_grads(gated_delta_rule, inp, reset=reset, backend="cuda")
    assert test[0].dtype == dtype and test[1].dtype == torch.float32
    assert_all_close(ref, test, **TOL[dtype], what=f"gdn cuda vs torch {dtype} reset={with_reset}")


def test_gdn_training_falls_back_when_fla_backward_is_disabled():
    """Where fla refuses its backward, "auto" trains through the torch path and "cuda" says why."""
    need(_peers.fla_chunk_gated_delta_rule)
    why = _peers.fla_gdn_backward_problem()
    if why is None:
        pytest.skip("fla's chunk backward is usable here; nothing to fall back from")
    inp = make_gdn_inputs(1, 64, 2, 32, 32, dtype=torch.float32, device=DEV, seed=13)
    ref = run_with_grads(gated_delta_rule, inp, backend="torch")
    test = run_with_grads(gated_delta_rule, inp, backend="auto")
    assert_all_close(ref, test, atol=1e-6, rtol=1e-6, what="gdn auto fallback")
    with pytest.raises(RuntimeError, match="gradients"):
        run_with_grads(gated_delta_rule, inp, backend="cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta_max", [1.0, 2.0], ids=["beta1", "beta2"])
def test_gdn_step_cuda_vs_torch(dtype, beta_max):
    need(_peers.fla_fused_recurrent_gated_delta_rule)
    inp = make_gdn_inputs(3, 1, *GDN_HKV, dtype=dtype, device=DEV, seed=6, beta_max=beta_max)
    args = [inp[k][:, 0] for k in ("q", "k", "v", "g", "beta")] + [None, inp["initial_state"]]
    o_ref, S_ref = gdn_step(*args, backend="torch")
    o, S = gdn_step(*args, backend="cuda")
    assert o.dtype == dtype and S.dtype == torch.float32
    assert_all_close((o_ref, S_ref, {}), (o, S, {}), **TOL[dtype], what=f"gdn_step {dtype}")


# ------------------------------------------------------------------------------------ conv
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "init", "reset"])
def test_conv_cuda_vs_torch(dtype, case):
    need(_peers.causal_conv1d_fn)
    b, d, t = 2, 64, 300
    inp = make_conv_inputs(b, d, t, 4, dtype=dtype, device=DEV, seed=7, init=case == "init")
    reset = random_reset(b, t, p=0.02, seed=8, device=DEV) if case == "reset" else None
    kw = dict(reset=reset, activation="silu")
    ref = run_with_grads(causal_conv1d, inp, backend="torch", **kw)
    test = run_with_grads(causal_conv1d, inp, backend="cuda", **kw)
    assert_all_close(ref, test, **TOL[dtype], what=f"conv cuda vs torch {dtype} {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_step_cuda_vs_torch(dtype):
    need(_peers.causal_conv1d_update)
    inp = make_conv_inputs(3, 64, 1, 4, dtype=dtype, device=DEV, seed=9)
    args = (inp["x"][..., 0], inp["initial_state"], inp["weight"], inp["bias"], "silu")
    o_ref, S_ref = causal_conv1d_step(*args, backend="torch")
    o, S = causal_conv1d_step(*args, backend="cuda")
    assert_all_close((o_ref, S_ref, {}), (o, S, {}), **TOL[dtype], what=f"conv step {dtype}")


# ------------------------------------------------------------------------------------ auto
def test_auto_backend_degrades_per_kernel():
    """``backend="auto"`` on CUDA works whatever subset of the kernels is installed, and gives the
    torch path's numbers (up to kernel tolerance); a missing kernel means the torch path on the GPU."""
    tol = TOL[torch.float32]
    s = make_ssd_inputs(1, 100, 4, 32, 1, 32, dtype=torch.float32, device=DEV, seed=10)
    g = make_gdn_inputs(1, 100, 2, 32, 32, dtype=torch.float32, device=DEV, seed=11)
    c = make_conv_inputs(1, 64, 100, 4, dtype=torch.float32, device=DEV, seed=12)
    for fn, inp in ((ssd, s), (gated_delta_rule, g), (causal_conv1d, c)):
        out_auto = fn(**inp, backend="auto")
        out_torch = fn(**inp, backend="torch")
        assert out_auto[0].device.type == out_auto[1].device.type == DEV
        assert_all_close((out_torch[0], out_torch[1], {}), (out_auto[0], out_auto[1], {}), **tol, what=fn.__name__)
    if _peers.causal_conv1d_fn()[0] is None:
        with pytest.raises(RuntimeError, match="causal_conv1d"):
            causal_conv1d(**c, backend="cuda")
