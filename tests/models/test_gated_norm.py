"""GatedRMSNorm's hand-written backward (``GatedRMSNormFn``) against the plain-autograd reference:
both gate orders, grouped and whole-row norms, gradcheck in fp64, strided inputs as the mixers pass
them, bf16 inputs and weights."""

import pytest
import torch

from megasleep.models.norm import GatedRMSNorm, GatedRMSNormFn, gated_rms_norm_reference


def _inputs(shape, dtype, seed, wdtype=None):
    gen = torch.Generator().manual_seed(seed)
    y, z = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    w = (1 + 0.3 * torch.randn(shape[-1], generator=gen, dtype=torch.float64)).to(wdtype or dtype)
    return y, z, w


def _grads(fn, y, z, w, seed=7):
    leaves = [t.detach().clone().requires_grad_() for t in (y, z, w)]
    out = fn(*leaves)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    out.backward(go)
    return [out.detach()] + [t.grad for t in leaves]


def _close(ref, test, tol, what):
    for name, a, b in zip(("out", "grad y", "grad z", "grad weight"), ref, test):
        assert a.dtype == b.dtype, f"{what} {name}: dtype {b.dtype}, expected {a.dtype}"
        err = (a.double() - b.double()).abs().max().item()
        scale = a.double().abs().max().item()
        assert err <= tol * (1 + scale), f"{what} {name}: max err {err:.3e} (scale {scale:.3e})"


@pytest.mark.parametrize("before", [False, True], ids=["gate-then-norm", "norm-then-gate"])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gradcheck_fp64(before, group_size):
    y, z, w = _inputs((2, 3, 8), torch.float64, seed=1)
    leaves = [t.clone().requires_grad_() for t in (y, z, w)]
    assert torch.autograd.gradcheck(lambda a, b, c: GatedRMSNormFn.apply(a, b, c, 1e-5, group_size, before),
                                    leaves, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("before", [False, True], ids=["gate-then-norm", "norm-then-gate"])
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_reference(before, group_size, dtype, tol):
    y, z, w = _inputs((3, 11, 64), dtype, seed=2)
    ref = _grads(lambda a, b, c: gated_rms_norm_reference(a, b, c, 1e-5, group_size, before), y, z, w)
    test = _grads(lambda a, b, c: GatedRMSNormFn.apply(a, b, c, 1e-5, group_size, before), y, z, w)
    _close(ref, test, tol, f"{dtype} before={before} gs={group_size}")


@pytest.mark.parametrize("before", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_strided_inputs_and_gradient(before):
    """z as a slice of a wider projection output and y as a transposed view (the mixers' layouts), and
    a non-contiguous incoming gradient."""
    y, z, w = _inputs((2, 9, 32), torch.float64, seed=3)

    def strided(fn):
        def run(a, b, c):
            wide = torch.cat([b, torch.ones_like(b[..., :5])], dim=-1)  # [.., 37]: z = wide[..., :32]
            yt = a.transpose(0, 1).contiguous().transpose(0, 1)
            return fn(yt, wide[..., :32], c).transpose(0, 1).contiguous().transpose(0, 1)
        return run

    ref = _grads(lambda a, b, c: gated_rms_norm_reference(a, b, c, 1e-6, 8, before), y, z, w)
    test = _grads(strided(lambda a, b, c: GatedRMSNormFn.apply(a, b, c, 1e-6, 8, before)), y, z, w)
    _close(ref, test, 1e-12, f"strided before={before}")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("before", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_bf16_inputs_computed_in_fp32(wdtype, before):
    """bf16 y, z (autocast / bf16 model): fp32 arithmetic, results in the inputs' dtypes, close to the
    fp32 reference on the same rounded values."""
    y, z, w = _inputs((2, 7, 64), torch.bfloat16, seed=4, wdtype=wdtype)
    ref = _grads(lambda a, b, c: gated_rms_norm_reference(a.float(), b.float(), c.float(), 1e-5, 32, before),
                 y, z, w)
    test = _grads(lambda a, b, c: GatedRMSNormFn.apply(a, b, c, 1e-5, 32, before), y, z, w)
    assert test[0].dtype == test[1].dtype == test[2].dtype == torch.bfloat16 and test[3].dtype == wdtype
    _close([t.to(d.dtype) for t, d in zip(ref, test)], test, 2e-2, f"bf16 before={before} w={wdtype}")


def test_module_uses_the_function_and_checks_shapes():
    norm = GatedRMSNorm(16, group_size=8)
    y, z, _ = _inputs((2, 3, 16), torch.float32, seed=5)
    out = norm(y.requires_grad_(), z)
    assert type(out.grad_fn).__name__ == "GatedRMSNormFnBackward"
    torch.testing.assert_close(out, gated_rms_norm_reference(y, z, norm.weight, norm.eps, 8))
    with pytest.raises(ValueError, match="must have one shape"):
        norm(y, z[..., :8])


@pytest.mark.parametrize("before", [False, True], ids=["gate-then-norm", "norm-then-gate"])
def test_under_torch_compile_the_module_runs_plain_autograd(monkeypatch, before):
    """While dynamo traces (``torch.compiler.is_compiling()``), GatedRMSNorm runs the plain-autograd
    reference: dynamo in torch 2.11 got this Function's gradients wrong (all of them, measured on
    2.11.0; right in 2.13), and inductor fuses the plain ops anyway. Same values and gradients."""
    y, z, w = _inputs((2, 5, 32), torch.float64, seed=8)
    norm = GatedRMSNorm(32, group_size=8, norm_before_gate=before).double()
    with torch.no_grad():
        norm.weight.copy_(w)

    def run():
        norm.weight.grad = None
        a, b = y.clone().requires_grad_(), z.clone().requires_grad_()
        out = norm(a, b)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
        return [out.detach(), a.grad, b.grad, norm.weight.grad], type(out.grad_fn).__name__

    eager, fn_eager = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiling, fn_compiling = run()
    assert fn_eager == "GatedRMSNormFnBackward" != fn_compiling
    _close(eager, compiling, 1e-12, f"before={before}")
