"""Real bf16 parameters, and an optional ``torch.compile`` of the blocks.

Autocast over fp32 weights keeps a bf16 copy of every weight alive for the whole forward and makes
ZeRO reduce fp32 gradients; casting the parameters themselves halves weight and gradient memory
and traffic. The SSM-sensitive parameters (Mamba-2's ``A_log``, ``dt_bias``, ``D``; GDN's
``A_log``, ``dt_bias``) are marked ``_keep_fp32`` by their mixers and stay fp32: they set decay
rates, where a bf16 rounding (8 bits of mantissa) moves ``exp(-exp(A_log) dt)`` visibly over long
windows. The mixers upcast them for the state math whatever their storage dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def keeps_fp32(param: torch.Tensor) -> bool:
    return bool(getattr(param, "_keep_fp32", False))


def cast_parameters(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place, except the ``_keep_fp32`` ones.
    Parameter objects are kept (``.data`` is replaced): tied weights stay tied and references held
    elsewhere stay valid. Returns ``model``."""
    for p in model.parameters():
        if p.is_floating_point() and not keeps_fp32(p):
            p.data = p.data.to(dtype)
    for mod in model.modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf.is_floating_point():
                setattr(mod, name, buf.to(dtype))
    return model


def fp32_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters :func:`cast_parameters` leaves in fp32 (an optimizer that wants one
    dtype per parameter group puts these in their own group)."""
    return [n for n, p in model.named_parameters() if keeps_fp32(p)]


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """``torch.compile`` each block in place (``nn.Module.compile``: parameter names and state-dict
    keys stay unchanged, so checkpoints and exports are unaffected). Blocks, not the whole model:
    the sleep loop's Python control flow (windows, passes, eviction) stays eager, and one compiled
    block type serves every window and pass. Returns ``model``."""
    for block in model.layers:
        block.compile(**compile_kwargs)
    return model
