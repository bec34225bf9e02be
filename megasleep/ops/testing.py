"""Input factories and forward/backward comparison helpers shared by tests/ops and tests/gpu."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _rand(gen, *shape, dtype, device, kind="randn"):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) if kind == "randn" else torch.rand(
        *shape, generator=gen, dtype=torch.float64
    )
    return t.to(device=device, dtype=dtype)


def random_reset(b: int, t: int, p: float = 0.1, seed: int = 0, device="cpu", force=True) -> torch.Tensor:
    """Random document starts; with ``force`` at least one reset mid-sequence and one at t=0 in row 0."""
    gen = _gen(seed)
    r = torch.rand(b, t, generator=gen) < p
    if force and t > 2:
        r[0, 0] = True
        r[-1, t // 2] = True
    return r.to(device)


def make_ssd_inputs(b, t, h, p, g, n, *, dtype=torch.float64, device="cpu", seed=0, init=True, D=True):
    gen = _gen(seed)
    x = _rand(gen, b, t, h, p, dtype=dtype, device=device)
    dt = F.softplus(_rand(gen, b, t, h, dtype=torch.float64, device="cpu") - 1.0).to(device=device, dtype=dtype)
    A = (-torch.exp(_rand(gen, h, dtype=torch.float64, device="cpu") * 0.5)).to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    B = _rand(gen, b, t, g, n, dtype=dtype, device=device)
    C = _rand(gen, b, t, g, n, dtype=dtype, device=device)
    out = {"x": x, "dt": dt, "A": A, "B": B, "C": C}
    out["D"] = _rand(gen, h, dtype=A.dtype, device=device) if D else None
    out["initial_state"] = _rand(gen, b, h, p, n, dtype=A.dtype, device=device) if init else None
    return out


def make_gdn_inputs(b, t, h, dk, dv, *, dtype=torch.float64, device="cpu", seed=0, init=True, beta_max=1.0):
    """``beta_max=2``: beta in (0, 2) as with ``allow_neg_eigval`` (negative eigenvalues of I - beta k k^T)."""
    gen = _gen(seed)
    q = F.normalize(_rand(gen, b, t, h, dk, dtype=torch.float64, device="cpu"), dim=-1).to(device=device, dtype=dtype)
    k = F.normalize(_rand(gen, b, t, h, dk, dtype=torch.float64, device="cpu"), dim=-1).to(device=device, dtype=dtype)
    v = _rand(gen, b, t, h, dv, dtype=dtype, device=device)
    g = F.logsigmoid(_rand(gen, b, t, h, dtype=torch.float64, device="cpu") + 2.0).to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype)
    beta = (beta_max * torch.sigmoid(_rand(gen, b, t, h, dtype=torch.float64, device="cpu"))).to(device=device,
                                                                                                  dtype=dtype)
    sd = torch.float32 if dtype != torch.float64 else dtype
    out = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    out["initial_state"] = _rand(gen, b, h, dk, dv, dtype=sd, device=device) if init else None
    return out


def make_conv_inputs(b, d, t, w, *, dtype=torch.float64, device="cpu", seed=0, init=True, bias=True):
    gen = _gen(seed)
    wd = torch.float32 if dtype != torch.float64 else dtype
    out = {
        "x": _rand(gen, b, d, t, dtype=dtype, device=device),
        "weight": _rand(gen, d, w, dtype=wd, device=device) * 0.5,
        "bias": _rand(gen, d, dtype=wd, device=device) if bias else None,
    }
    out["initial_state"] = _rand(gen, b, d, w - 1, dtype=wd, device=device) if init else None
    return out


def run_with_grads(fn, inputs: dict, *, seed=123, **kwargs):
    """Run ``fn(**inputs, **kwargs)`` -> (out, state) on fresh leaf copies of the floating inputs and
    backprop fixed random cotangents for both. Returns ``(out, state, {name: grad})``."""
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            leaves[k] = v.detach().clone().requires_grad_(True)
        else:
            leaves[k] = v
    out, state = fn(**leaves, **kwargs)
    gen = _gen(seed)
    go = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    gs = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.device, state.dtype)
    torch.autograd.backward([out, state], [go, gs])
    grads = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return out.detach(), state.detach(), grads


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_all_close(ref, test, *, atol, rtol, what=""):
    """Compare (out, state, grads) triples from :func:`run_with_grads` with one message per tensor.

    The tolerance is relative to each reference tensor's scale: ``|a - b| <= atol + rtol * max|a|``."""
    o1, s1, g1 = ref
    o2, s2, g2 = test
    pairs = [("out", o1, o2), ("final_state", s1, s2)]
    pairs += [(f"grad[{k}]", g1[k], g2.get(k)) for k in g1]
    bad = []
    for name, a, b in pairs:
        if a is None and b is None:
            continue
        if (a is None) != (b is None):
            bad.append(f"{name}: one side is None")
            continue
        if a.shape != b.shape:
            bad.append(f"{name}: shape {list(a.shape)} vs {list(b.shape)}")
            continue
        if not torch.isfinite(b.double()).all():
            bad.append(f"{name}: non-finite values")
            continue
        scale = a.double().abs().max().item() if a.numel() else 0.0
        err = max_err(a, b)
        if err > atol + rtol * scale:
            bad.append(f"{name}: max abs err {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}")
    if bad:
        raise AssertionError(f"{what}: " + "; ".join(bad))


def count_calls(monkeypatch, targets: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Count the calls of ``module.attribute`` for each ``{key: ("module", "attribute")}`` (patched
    with pytest's ``monkeypatch``, so for the calling test only). Returns ``{key: calls}``, filled in as
    they happen; keys never called are absent. How the CUDA tests prove which path really ran."""
    import importlib

    calls: dict[str, int] = {}

    def counting(key, fn):
        def counted(*args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for key, (module, attr) in targets.items():
        mod = importlib.import_module(module)
        monkeypatch.setattr(mod, attr, counting(key, getattr(mod, attr)))
    return calls


# ------------------------------------------------------------------ Triton kernels without a GPU

def enable_triton_interpreter() -> None:
    """Let mamba_ssm's and fla's Triton kernels run on CPU tensors under Triton's interpreter.

    ``TRITON_INTERPRET=1`` must be in the environment before mamba_ssm / fla are imported (Triton
    chooses interpreted or compiled at ``@triton.jit`` time). The interpreter itself runs any kernel
    on CPU tensors, in numpy; what stops these packages is host code written for a GPU, patched here
    for the whole process (a test harness, never used by training):

    * ``with torch.cuda.device(t.device.index)`` around launches: a no-op for CPU tensors;
    * ``torch.cuda.get_device_properties(...).multi_processor_count``, which sets how mamba_ssm's
      backward splits its reductions over heads: where CUDA is absent, a stand-in with the 132 SMs of
      an H100 / H200 (SXM), so the reductions are split as on those GPUs;
    * autotuning: the interpreter has no benchmark driver, so each autotuner keeps one of its own
      configs, the one with the largest blocks (fewest program instances, which is what the
      interpreter's time grows with; the kernels are correct for every config, only speed differs);
    * bf16 arithmetic: the interpreter keeps bf16 as its raw 16 bits (numpy has no bf16) and then
      computes on those bits as integers (``tl.dot``, elementwise ops, ``tl.sum`` / ``max`` / ``min``
      / ``cumsum`` / ``cumprod``; a 16 x 16 bf16 ``tl.dot`` was off by ~3e10). Here they compute in fp32
      on the exact widened values and round results back to bf16 (to nearest even), as a GPU does;
    * loop induction variables: compiled Triton makes ``i`` in ``for i in range(n)`` a tensor (fla
      calls ``i.to(tl.int64)``); Triton's interpreter leaves a Python int, so its source rewriter also
      converts the loop variable, as it already converts every assigned value.
    """
    from . import _peers

    if not _peers.triton_interpret_env():
        raise RuntimeError("enable_triton_interpreter: set TRITON_INTERPRET=1 before importing "
                           "mamba_ssm / fla")
    if _peers._interpreter_ready:
        return
    import ast
    import contextlib
    import types

    import numpy as np
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    cuda_device = torch.cuda.device

    def device(idx):
        if idx is None or (isinstance(idx, torch.device) and idx.type == "cpu"):
            return contextlib.nullcontext()
        return cuda_device(idx)

    torch.cuda.device = device
    if not torch.cuda.is_available():
        torch.cuda.get_device_properties = lambda device=None: types.SimpleNamespace(
            name="Triton interpreter (CPU)", multi_processor_count=132, major=0, minor=0
        )

    tuned_run = autotuner.Autotuner.run

    def blocks(config) -> int:
        size = 1
        for v in config.kwargs.values():
            size *= v if isinstance(v, int) and v > 1 else 1
        return size

    def one_config_run(self, *args, **kwargs):
        self.configs = [max(self.configs, key=blocks)]
        return tuned_run(self, *args, **kwargs)

    autotuner.Autotuner.run = one_config_run

    builder = interpreter.InterpreterBuilder
    dot, binary, unary = builder.create_dot, builder.binary_op, builder.unary_op

    def wide(bits):  # bf16 bits -> fp32 values (exact)
        return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)

    def narrow(values):  # fp32 values -> bf16 bits, rounded to nearest even (finite values)
        u = np.asarray(values, dtype=np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)

    def widened(h):
        return interpreter.TensorHandle(wide(h.data), tl.float32) if h.dtype.scalar == tl.bfloat16 else h

    def narrowed(h):
        return interpreter.TensorHandle(narrow(h.data), tl.bfloat16) if h.dtype.scalar == tl.float32 else h

    def create_dot(self, a, b, d, *args):
        return dot(self, widened(a), widened(b), d, *args)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return binary(self, lhs, rhs, op)
        out = op(widened(lhs).data, widened(rhs).data)
        return interpreter.TensorHandle(out, tl.int1) if out.dtype == np.bool_ else \
            interpreter.TensorHandle(narrow(out), tl.bfloat16)

    def unary_op(self, arg, op):
        if arg.dtype.scalar != tl.bfloat16:
            return unary(self, arg, op)
        return narrowed(unary(self, widened(arg), op))

    builder.create_dot, builder.binary_op, builder.unary_op = create_dot, binary_op, unary_op

    # the fast paths of tl.sum / tl.max / tl.min / tl.cumsum / tl.cumprod run numpy on the raw bits too
    reduce_ops, scan_ops = interpreter.ReduceOps, interpreter.ScanOps
    reduce_sum, reduce_min_max = reduce_ops.sum, reduce_ops.min_max
    scan_sum, scan_prod = scan_ops.cumsum, scan_ops.cumprod

    def bf16_sum(self, input):
        if input.dtype != tl.bfloat16:
            return reduce_sum(self, input)
        out = np.sum(wide(input.handle.data), axis=self.axis, keepdims=self.keep_dims)
        return self.to_tensor(narrow(out), tl.bfloat16)

    def bf16_min_max(self, input, val_reduce_op, idx_reduce_op=None):
        x = input[0] if isinstance(input, tuple) else input
        if x.dtype != tl.bfloat16:
            return reduce_min_max(self, input, val_reduce_op, idx_reduce_op)
        data = wide(x.handle.data)
        val = self.to_tensor(narrow(val_reduce_op(data, axis=self.axis, keepdims=self.keep_dims)), tl.bfloat16)
        if idx_reduce_op is None:
            return val
        return val, self.to_tensor(idx_reduce_op(data, axis=self.axis, keepdims=self.keep_dims), tl.int32)

    def bf16_scan(np_scan, fallback):
        def scan(self, input):
            if input.dtype != tl.bfloat16:
                return fallback(self, input)
            return [self.to_tensor(narrow(np_scan(wide(input.handle.data), axis=self.axis)), tl.bfloat16)]

        return scan

    reduce_ops.sum, reduce_ops.min_max = bf16_sum, bf16_min_max
    scan_ops.cumsum, scan_ops.cumprod = bf16_scan(np.cumsum, scan_sum), bf16_scan(np.cumprod, scan_prod)

    class _LoopVariablesAsTensors(interpreter.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            if isinstance(node.target, ast.Name):
                name = node.target.id
                to_tensor = ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                          attr="to_tensor", ctx=ast.Load())
                args = [ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)]
                value = ast.Call(func=to_tensor, args=args, keywords=[])
                convert = ast.Assign(targets=[ast.Name(id=name, ctx=ast.Store())], value=value)
                node.body.insert(0, ast.copy_location(convert, node))
            return node

    interpreter.FunctionRewriter.ast_transformer = _LoopVariablesAsTensors()
    _peers._interpreter_ready = True  # from now on CPU tensors go to the Triton kernels


def kernel_test_device() -> str:
    """The device tests/gpu runs its kernel tests on: ``"cpu"`` under Triton's interpreter (set up
    here), else ``"cuda"``; skips the calling module, saying why, when neither is available."""
    import pytest

    from . import _peers

    if _peers.triton_interpret_env():
        enable_triton_interpreter()
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (torch.cuda.is_available() is False) and Triton's interpreter is "
                    "off (TRITON_INTERPRET=1 runs these kernels on CPU)", allow_module_level=True)
    return "cuda"
