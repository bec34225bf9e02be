"""Real bf16 parameters, and an optional ``torch.compile`` of the blocks.

Autocast over fp32 weights keeps a bf16 copy of every weight alive for the whole forward and makes
ZeRO reduce fp32 gradients; casting the parameters themselves halves weight and gradient memory
and traffic. The SSM-sensitive parameters (Mamba-2's ``A_log``, ``dt_bias``, ``D``; GDN's
``A_log``, ``dt_bias``) are marked ``_keep_fp32`` by their mixers and stay fp32: they set decay
rates, where a bf16 rounding (8 bits of mantissa) moves ``exp(-exp(A_log) dt)`` visibly over long
windows. The mixers upcast them for the state math whatever their storage dtype.

Under DeepSpeed (``train.precision``, docs/performance.md): ``bf16`` with ZeRO-1/2 casts the model
here and runs DeepSpeed in its fp32 mode, so its ZeRO optimizer keeps fp32 master partitions and
fp32 gradient accumulation and leaves the ``_keep_fp32`` parameters alone. DeepSpeed's own ``bf16``
mode would cast every parameter (it can keep only buffers in fp32), and ZeRO-3 keeps all partitions
in one buffer of one dtype, so under ZeRO-3 ``bf16`` is DeepSpeed's ``bf16`` mode: every parameter
bf16, fp32 master partitions.
"""

from __future__ import annotations

import torch
from torch import nn


def resolve_precision(requested: str, cuda: bool) -> str:
    """``auto``: bf16 autocast over fp32 weights on a bf16-capable GPU, fp32 elsewhere."""
    if requested == "auto":
        return "bf16-autocast" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    return requested


def autocast_dtype(precision: str) -> torch.dtype | None:
    """Both bf16 modes run the forward under bf16 autocast: with bf16 weights it only routes the
    mixed fp32 / bf16 operations (the kept-fp32 parameters, losses) to the right dtype."""
    return torch.bfloat16 if precision in ("bf16", "bf16-autocast") else None


def casts_itself(precision: str, zero_stage: int) -> bool:
    """Whether the trainer casts the model (bf16 under ZeRO-1/2) rather than DeepSpeed (ZeRO-3)."""
    return precision == "bf16" and zero_stage in (1, 2)


def deepspeed_precision(precision: str, zero_stage: int, where: str) -> dict:
    """The DeepSpeed JSON keys that implement ``precision`` at ``zero_stage`` (merged into the config).
    ``where`` names the config in the error for a combination DeepSpeed cannot run."""
    if precision != "bf16":
        return {}
    if zero_stage == 0:
        from megasleep.config import ConfigError

        raise ConfigError(f"{where}: train.precision=bf16 with ZeRO-0: DeepSpeed would update the bf16 weights "
                          "without fp32 master copies; use ZeRO-1 (the same maths on one rank) or "
                          "train.precision=bf16-autocast")
    # fp32 gradient accumulation in both cases; gradients are reduced in bf16 (DeepSpeed's bf16 default)
    common = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "bf16"}
    if zero_stage == 3:
        return {"bf16": {"enabled": True}, **common}
    return {"bf16": {"enabled": False}, **common}


def planned_dtypes(model: nn.Module, precision: str, zero_stage: int) -> dict[str, torch.dtype]:
    """The dtype every parameter has once DeepSpeed's engine is built (the trainer checks it)."""
    if precision != "bf16":
        return {n: torch.float32 for n, _ in model.named_parameters()}
    keep = casts_itself(precision, zero_stage)
    return {n: torch.float32 if keep and keeps_fp32(p) else torch.bfloat16 for n, p in model.named_parameters()}


def check_dtypes(model: nn.Module, planned: dict[str, torch.dtype]) -> None:
    wrong = [f"{n}: {p.dtype} (planned {planned[n]})" for n, p in model.named_parameters() if p.dtype != planned[n]]
    if wrong:
        raise RuntimeError(f"parameter dtypes after DeepSpeed's initialisation differ from the plan: {wrong[:4]}")


def split_groups_by_dtype(groups: list[dict]) -> list[dict]:
    """Optimizer groups with one parameter dtype each (DeepSpeed's ZeRO flattens a group into one
    buffer), the bf16 ones first (ZeRO-1/2 take the first group's dtype as the model's, which turns
    on its fp32 gradient accumulation). One-dtype groups come back unchanged."""
    parts = []
    for g in groups:
        dtypes = list(dict.fromkeys(p.dtype for p in g["params"]))
        for dt in dtypes:
            part = dict(g, params=[p for p in g["params"] if p.dtype == dt])
            if len(dtypes) > 1 and dt == torch.float32:
                part["name"] = f"{g.get('name', 'group')}_fp32"
            parts.append(part)
    return sorted(parts, key=lambda g: g["params"][0].dtype == torch.float32)  # stable: order kept otherwise


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
