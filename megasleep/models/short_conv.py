"""Depthwise causal short convolution with a carried state: GDN's q/k/v convs (SiLU, no bias, named like
FLA's ShortConvolution) and the optional conv over attention's q/k/v (bias, no activation, as
mamba_ssm's MHA with ``d_conv > 0``). Its history is short-term memory (docs/sleep.md)."""

from __future__ import annotations

from torch import Tensor, nn

from megasleep.models.cache import MixContext
from megasleep.ops.conv import causal_conv1d, causal_conv1d_step


class ShortConv(nn.Conv1d):
    """Weights [D, 1, W]; ``activation`` "silu" or None."""

    def __init__(self, dim: int, width: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(dim, dim, width, groups=dim, padding=width - 1, bias=bias)
        self.activation = activation

    def run(self, x: Tensor, state: Tensor | None, ctx: MixContext) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> (act(conv(x)) [B, T, D], conv state [B, D, W-1])."""
        w = self.weight.squeeze(1)
        if x.shape[1] == 1 and state is not None and ctx.reset is None:
            y, new = causal_conv1d_step(x[:, 0], state, w, self.bias, self.activation, backend=ctx.backend)
            return y[:, None], new
        y, new = causal_conv1d(x.transpose(1, 2), w, self.bias, initial_state=state, reset=ctx.reset,
                               activation=self.activation, backend=ctx.backend)
        return y.transpose(1, 2), new
