"""Lazy imports of the peer packages (mamba_ssm, causal_conv1d, fla): references and CUDA kernels.

Every getter returns ``(obj, None)`` or ``(None, reason)`` so callers and tests can fall back or
skip with the reason. Nothing here is imported at ``megasleep.ops`` import time (``import fla``
alone costs 5-15 s).

``mamba_ssm`` and ``causal_conv1d`` unconditionally import their compiled CUDA extensions
(``selective_scan_cuda``, ``causal_conv1d_cuda``). On a machine without CUDA we register empty
stand-in modules under those names (only if the real one does not import) so that their pure
PyTorch references and Triton modules import. With CUDA present we never stand in for
``causal_conv1d_cuda`` (so a missing conv kernel is reported as missing, not faked), but we do
stand in for ``selective_scan_cuda`` when it is absent: nothing in megasleep calls it, and
``import mamba_ssm`` (hence the Triton SSD kernels) needs it. A stand-in raises a clear error if
anything ever calls into it.

The Triton kernels (mamba_ssm's SSD and decode kernels, fla's gated delta rule) also run without a
GPU under Triton's interpreter (``TRITON_INTERPRET=1``, set before mamba_ssm / fla are imported):
they then take CPU tensors and execute in numpy, slowly, which is how the CPU test suite checks the
kernel path and its wrappers (``megasleep.ops.testing.enable_triton_interpreter``, which sets
``triton_interpreting()``). The compiled ``causal_conv1d`` kernels have no such mode.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from functools import cache

import torch

Result = tuple  # (obj, None) | (None, reason)


class _StandIn(types.ModuleType):
    __megasleep_standin__ = True

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(
            f"{self.__name__}.{attr}: '{self.__name__}' is an empty stand-in registered by megasleep.ops._peers "
            "because the compiled CUDA extension is not installed"
        )


def is_standin(name: str) -> bool:
    mod = sys.modules.get(name)
    return bool(mod is not None and getattr(mod, "__megasleep_standin__", False))


def _ensure_extension(name: str, allow_standin: bool) -> str | None:
    """Import compiled extension ``name`` or register a stand-in; return None or why it is missing."""
    if name in sys.modules:
        return f"compiled extension {name} is not installed (stand-in in use)" if is_standin(name) else None
    try:
        importlib.import_module(name)
        return None
    except Exception as e:  # ImportError, or an OSError from a broken .so
        reason = f"compiled extension {name} does not import ({type(e).__name__}: {e})"
    if allow_standin:
        sys.modules[name] = _StandIn(name)
    return reason


def _cuda_ok() -> bool:
    return torch.cuda.is_available()


def triton_interpret_env() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton for its interpreter (read as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


# set by megasleep.ops.testing.enable_triton_interpreter(), which patches the peers' GPU-only host code
_interpreter_ready = False


def triton_interpreting() -> bool:
    """Whether CPU tensors go to the Triton kernels, under Triton's interpreter: only once
    ``megasleep.ops.testing.enable_triton_interpreter()`` has run (with ``TRITON_INTERPRET=1``); the
    variable alone does not send them (the peers' host code would fail on CPU tensors)."""
    return _interpreter_ready


def _prepare_mamba() -> str | None:
    """Make ``import mamba_ssm`` possible; returns a reason string when it cannot be."""
    _ensure_extension("selective_scan_cuda", allow_standin=True)
    _ensure_extension("causal_conv1d_cuda", allow_standin=not _cuda_ok())
    return None


def _try(modname: str, attr: str, prepare=None) -> Result:
    try:
        if prepare is not None:
            prepare()
        mod = importlib.import_module(modname)
        return getattr(mod, attr), None
    except Exception as e:
        return None, f"cannot import {modname}.{attr}: {type(e).__name__}: {e}"


# --------------------------------------------------------------------------- references (CPU)
@cache
def ssd_minimal_discrete() -> Result:
    """``mamba_ssm.modules.ssd_minimal.ssd_minimal_discrete(X, A, B, C, block_len, initial_states)``."""
    return _try("mamba_ssm.modules.ssd_minimal", "ssd_minimal_discrete", _prepare_mamba)


@cache
def fla_naive_recurrent_gated_delta_rule() -> Result:
    """``fla.ops.gated_delta_rule.naive_recurrent_gated_delta_rule(q, k, v, beta, g, ...)``."""
    return _try("fla.ops.gated_delta_rule.naive", "naive_recurrent_gated_delta_rule")


@cache
def fla_naive_chunk_gated_delta_rule() -> Result:
    return _try("fla.ops.gated_delta_rule.naive", "naive_chunk_gated_delta_rule")


@cache
def hf_torch_chunk_gated_delta_rule() -> Result:
    """transformers' Qwen3-Next chunked GDN in pure torch: ``(query, key, value, g, beta, chunk_size,
    initial_state, output_final_state)``, q/k/v ``[B, T, H, D]``. transformers wraps it so that it
    dispatches to FLA's Triton kernel when fla is installed; the pure-torch original is unwrapped."""
    import inspect

    fn, why = _try("transformers.models.qwen3_next.modeling_qwen3_next", "torch_chunk_gated_delta_rule")
    return (inspect.unwrap(fn), None) if fn is not None else (None, why)


@cache
def causal_conv1d_ref() -> Result:
    """``causal_conv1d.causal_conv1d_interface.causal_conv1d_ref`` (pure PyTorch)."""
    return _try("causal_conv1d.causal_conv1d_interface", "causal_conv1d_ref", _prepare_mamba)


@cache
def causal_conv1d_update_ref() -> Result:
    return _try("causal_conv1d.causal_conv1d_interface", "causal_conv1d_update_ref", _prepare_mamba)


# --------------------------------------------------------------------------- kernels (CUDA)
def _need_cuda() -> str | None:
    """Why a compiled CUDA kernel cannot run here, or None."""
    if not _cuda_ok():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    return None


def _need_triton_device() -> str | None:
    """Why a Triton kernel cannot run here (neither CUDA nor Triton's interpreter), or None."""
    if not _cuda_ok() and not triton_interpreting():
        return ("CUDA is not available (torch.cuda.is_available() is False) and Triton's interpreter is not "
                "set up (TRITON_INTERPRET=1 and megasleep.ops.testing.enable_triton_interpreter())")
    return None


@cache
def mamba_chunk_scan_combined() -> Result:
    """Triton SSD kernel ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``."""
    if (r := _need_triton_device()) is not None:
        return None, r
    return _try("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined", _prepare_mamba)


@cache
def selective_state_update() -> Result:
    """Triton decode kernel ``mamba_ssm.ops.triton.selective_state_update.selective_state_update``."""
    if (r := _need_triton_device()) is not None:
        return None, r
    return _try("mamba_ssm.ops.triton.selective_state_update", "selective_state_update", _prepare_mamba)


def _conv_kernel(attr: str) -> Result:
    if (r := _need_cuda()) is not None:
        return None, r
    r = _ensure_extension("causal_conv1d_cuda", allow_standin=False)
    if r is not None:
        return None, r
    return _try("causal_conv1d.causal_conv1d_interface", attr)


@cache
def causal_conv1d_fn() -> Result:
    """CUDA kernel ``causal_conv1d.causal_conv1d_fn`` (needs the compiled ``causal_conv1d_cuda``)."""
    return _conv_kernel("causal_conv1d_fn")


@cache
def causal_conv1d_update() -> Result:
    return _conv_kernel("causal_conv1d_update")


@cache
def fla_chunk_gated_delta_rule() -> Result:
    """Triton kernel ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``."""
    if (r := _need_triton_device()) is not None:
        return None, r
    return _try("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")


@cache
def fla_fused_recurrent_gated_delta_rule() -> Result:
    """Triton kernel ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`` (forward only)."""
    if (r := _need_triton_device()) is not None:
        return None, r
    return _try("fla.ops.gated_delta_rule", "fused_recurrent_gated_delta_rule")


@cache
def fla_gdn_backward_problem() -> str | None:
    """Why fla's ``chunk_gated_delta_rule`` *backward* cannot be used here, or None.

    fla refuses the gated ``chunk_bwd_dqkwg`` on Hopper GPUs with 3.4.0 <= Triton < 3.7.1 (wrong
    results, fla issue #640) unless its tilelang backend is installed; the forward is unaffected.
    Seen on an H100 with torch 2.11 / Triton 3.6: the backward raised RuntimeError.
    """
    fn, why = fla_chunk_gated_delta_rule()
    if fn is None:
        return why
    try:
        import fla.utils as fu
    except Exception as e:  # pragma: no cover - fla imported above
        return f"cannot import fla.utils: {e}"
    hopper = bool(getattr(fu, "IS_NVIDIA_HOPPER", False))
    bad_triton = bool(getattr(fu, "TRITON_ABOVE_3_4_0", False)) and not bool(getattr(fu, "TRITON_ABOVE_3_7_1", True))
    if hopper and bad_triton and importlib.util.find_spec("tilelang") is None:
        import triton

        return (
            f"fla's chunk_gated_delta_rule backward is disabled by fla on Hopper GPUs with Triton "
            f"{triton.__version__} (>= 3.4.0, < 3.7.1; fla issue #640); upgrade Triton to >= 3.7.1 or install tilelang"
        )
    return None


def kernel_report() -> dict[str, str]:
    """``{kernel: "ok" | reason}`` for every CUDA kernel megasleep can dispatch to."""
    out = {}
    for name, getter in (
        ("mamba_chunk_scan_combined", mamba_chunk_scan_combined),
        ("selective_state_update", selective_state_update),
        ("causal_conv1d_fn", causal_conv1d_fn),
        ("causal_conv1d_update", causal_conv1d_update),
        ("chunk_gated_delta_rule", fla_chunk_gated_delta_rule),
        ("fused_recurrent_gated_delta_rule", fla_fused_recurrent_gated_delta_rule),
    ):
        fn, reason = getter()
        out[name] = "ok" if fn is not None else reason
    if out["chunk_gated_delta_rule"] == "ok" and (why := fla_gdn_backward_problem()) is not None:
        out["chunk_gated_delta_rule"] = f"forward only: {why}"
    return out
