"""The channels-last causal conv with its hand-written backward (``ops/conv/fused.py``, used by
``causal_conv1d_chunk``): gradcheck in fp64, the mixer's strided layouts, resets, short sequences,
16-bit inputs and weights, and the free ``transpose(1, 2)`` of its output."""

import pytest
import torch

from megasleep.ops.conv import causal_conv1d_chunk, causal_conv1d_naive
from megasleep.ops.testing import assert_all_close, make_conv_inputs, random_reset, run_with_grads


@pytest.mark.parametrize("t", [1, 2, 9])
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("init,bias", [(True, True), (False, False)], ids=["init+bias", "bare"])
def test_gradcheck_fp64(t, with_reset, activation, init, bias):
    inp = make_conv_inputs(2, 3, t, 4, seed=t, init=init, bias=bias)
    reset = random_reset(2, t, p=0.3, seed=t) if with_reset else None
    names = [k for k, v in inp.items() if v is not None]
    leaves = [inp[k].clone().requires_grad_() for k in names]

    def fn(*args):
        out, state = causal_conv1d_chunk(**dict(zip(names, args)), reset=reset, activation=activation)
        return out, state

    assert torch.autograd.gradcheck(fn, leaves, atol=1e-9, rtol=1e-7)


def _as_the_mixer_passes(kw):
    """x [B,D,T] as a transposed slice of a wider [B,T,E] projection output, the state a transposed
    [B,D,W-1] view: strides no contiguous test exercises. Differentiable: gradients reach the inputs."""
    x = kw["x"]
    wide = torch.cat([torch.zeros_like(x[:, :2]), x, torch.zeros_like(x[:, :3])], dim=1)  # [B, D+5, T]
    wide = wide.transpose(1, 2).contiguous()  # [B, T, D+5] storage, as an input projection's output
    kw = dict(kw, x=wide[..., 2: 2 + x.shape[1]].transpose(1, 2))
    if kw.get("initial_state") is not None:
        kw["initial_state"] = kw["initial_state"].transpose(1, 2).contiguous().transpose(1, 2)
    return kw


@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_strided_inputs_match_naive_and_output_is_channels_last(with_reset):
    b, d, t, w = 2, 12, 23, 4
    inp = make_conv_inputs(b, d, t, w, seed=3)
    reset = random_reset(b, t, p=0.2, seed=4) if with_reset else None
    strided = _as_the_mixer_passes(inp)
    assert not strided["x"].is_contiguous() and strided["x"].stride(1) == 1
    out, _ = causal_conv1d_chunk(**strided, reset=reset, activation="silu")
    assert out.transpose(1, 2).is_contiguous(), "output should be a [B,D,T] view of [B,T,D] storage"

    def through_view(**kw):
        return causal_conv1d_chunk(**_as_the_mixer_passes(kw), reset=reset, activation="silu")

    ref = run_with_grads(causal_conv1d_naive, inp, reset=reset, activation="silu")
    test = run_with_grads(through_view, inp)
    assert_all_close(ref, test, atol=1e-12, rtol=1e-12, what=f"strided conv reset={with_reset}")


def test_sixteen_bit_weights_and_inputs():
    """bf16 inputs, weights, bias and state (a bf16 model): computed in fp32, every gradient returned
    in its input's dtype and close to the fp32 reference on the same (rounded) values."""
    inp = make_conv_inputs(2, 8, 30, 4, seed=6, dtype=torch.float32)
    reset = random_reset(2, 30, p=0.2, seed=6)
    bf = {k: v.to(torch.bfloat16) for k, v in inp.items()}
    ref = run_with_grads(causal_conv1d_naive, {k: v.float() for k, v in bf.items()}, reset=reset,
                         activation="silu")
    test = run_with_grads(causal_conv1d_chunk, bf, reset=reset, activation="silu")
    assert test[0].dtype == torch.bfloat16 and test[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in test[2].values())
    assert_all_close(ref, test, atol=3e-2, rtol=2e-2, what="bf16 conv")


def test_empty_sequence_keeps_state():
    inp = make_conv_inputs(2, 4, 0, 4, seed=1)
    out, state = causal_conv1d_chunk(**inp, activation="silu")
    assert out.shape == (2, 4, 0)
    torch.testing.assert_close(state, inp["initial_state"])
