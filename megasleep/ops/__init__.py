"""Kernels for the SSM mixers. Each op: ``*_naive`` (token loop, the obviously-correct reference),
``*_chunk`` (pure PyTorch, O(T), chunk-parallel; the CPU default), a dispatcher choosing the CUDA
kernel (``backend="auto" | "torch" | "cuda"``) and a single-token ``*_step`` for decoding.

Conventions (docs/architecture.md, "Tensor conventions"): layout ``[batch, time, heads, dim]``
(conv: ``[batch, channels, time]``); state math in fp32 (fp64 if the inputs are fp64); outputs in
the input dtype, final states fp32; ``initial_state=None`` means zeros; ``reset`` (BoolTensor
``[B, T]``) zeroes the state (and conv history) before token ``t`` is absorbed. Every op returns
``(output, final_state)``. Peer packages (mamba_ssm, fla, causal_conv1d) are imported lazily.
"""

from .conv import causal_conv1d, causal_conv1d_chunk, causal_conv1d_naive, causal_conv1d_step
from .gated_delta import gated_delta_rule, gdn_chunk, gdn_naive, gdn_step
from .ssd import ssd, ssd_chunk, ssd_naive, ssd_step

BACKENDS = ("auto", "torch", "cuda")

__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "causal_conv1d_chunk",
    "causal_conv1d_naive",
    "causal_conv1d_step",
    "gated_delta_rule",
    "gdn_chunk",
    "gdn_naive",
    "gdn_step",
    "ssd",
    "ssd_chunk",
    "ssd_naive",
    "ssd_step",
]
