"""Causal short conv: chunk == naive (outputs, final state, every gradient incl. the initial state),
resets, step, dispatch, and == causal_conv1d's causal_conv1d_ref where it imports."""

import pytest
import torch
import torch.nn.functional as F

from megasleep.ops import _peers
from megasleep.ops.conv import causal_conv1d, causal_conv1d_chunk, causal_conv1d_naive, causal_conv1d_step
from megasleep.ops.testing import assert_all_close, make_conv_inputs, random_reset, run_with_grads

SHAPES = [(1, 3, 2, 4), (2, 5, 37, 4), (3, 4, 16, 2), (2, 6, 9, 3), (2, 3, 1, 4)]  # (b, d, t, w); T < W-1 too


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}d{}t{}w{}".format(*s))
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_chunk_matches_naive_fp64(shape, with_reset, activation):
    b, d, t, w = shape
    inp = make_conv_inputs(b, d, t, w, seed=t + w)
    reset = random_reset(b, t, p=0.2, seed=t) if with_reset else None
    ref = run_with_grads(causal_conv1d_naive, inp, reset=reset, activation=activation)
    test = run_with_grads(causal_conv1d_chunk, inp, reset=reset, activation=activation)
    assert_all_close(ref, test, atol=1e-12, rtol=1e-12, what=f"conv {shape} reset={with_reset}")


def test_matches_torch_conv1d():
    inp = make_conv_inputs(2, 5, 20, 4, seed=1, init=False)
    ref = F.conv1d(inp["x"], inp["weight"][:, None], inp["bias"], padding=3, groups=5)[..., :20]
    for fn in (causal_conv1d_naive, causal_conv1d_chunk):
        out, state = fn(**inp)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(state, inp["x"][..., -3:])


def test_reset_semantics():
    b, d, t, t0 = 2, 4, 20, 9
    inp = make_conv_inputs(b, d, t, 4, seed=5)
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[:, t0] = True
    o, S = causal_conv1d_chunk(**inp, reset=reset)
    o_no, _ = causal_conv1d_chunk(**inp)
    o_tail, S_tail = causal_conv1d_chunk(inp["x"][..., t0:], inp["weight"], inp["bias"])
    torch.testing.assert_close(o[..., :t0], o_no[..., :t0])
    torch.testing.assert_close(o[..., t0:], o_tail)
    torch.testing.assert_close(S, S_tail)
    # reset in the last W-1 tokens: the state holds zeros before the document start
    r = torch.zeros(b, t, dtype=torch.bool)
    r[:, t - 2] = True
    _, S2 = causal_conv1d_chunk(**inp, reset=r)
    assert torch.all(S2[..., 0] == 0) and torch.equal(S2[..., 1:], inp["x"][..., -2:])


def test_step_iterated_matches_naive():
    inp = make_conv_inputs(2, 5, 11, 4, seed=7)
    o_ref, S_ref = causal_conv1d_naive(**inp, activation="silu")
    S = inp["initial_state"]
    os = []
    for i in range(11):
        o, S = causal_conv1d_step(inp["x"][..., i], S, inp["weight"], inp["bias"], "silu")
        os.append(o)
    torch.testing.assert_close(torch.stack(os, -1), o_ref)
    torch.testing.assert_close(S, S_ref)


def test_dispatch_on_cpu_and_dtypes():
    inp = make_conv_inputs(1, 4, 10, 4, seed=4)
    ref = causal_conv1d_chunk(**inp)
    for backend in ("auto", "torch"):
        out = causal_conv1d(**inp, backend=backend)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(RuntimeError, match="cuda"):
        causal_conv1d(**inp, backend="cuda")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_chunk(**inp, activation="relu")
    bf = make_conv_inputs(2, 4, 10, 4, seed=4, dtype=torch.bfloat16)
    o, S = causal_conv1d_chunk(**bf)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32


@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_causal_conv1d_ref(activation):
    fn, why = _peers.causal_conv1d_ref()
    if fn is None:
        pytest.skip(why)
    inp = make_conv_inputs(2, 6, 15, 4, seed=3, dtype=torch.float32)

    def ref_fn(x, weight, bias, initial_state):
        return fn(x, weight, bias, initial_states=initial_state, return_final_states=True, activation=activation)

    ref = run_with_grads(ref_fn, inp)
    test = run_with_grads(causal_conv1d_chunk, inp, activation=activation)
    assert_all_close(ref, test, atol=1e-5, rtol=1e-5, what="conv vs causal_conv1d_ref")


def test_chunk_matches_naive_fp32_and_bf16():
    """The channels-last fused path against the token loop in fp32 and bf16 (computed in fp32)."""
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        inp = make_conv_inputs(3, 16, 41, 4, seed=11, dtype=dtype)
        ref = run_with_grads(causal_conv1d_naive, inp, activation="silu")
        test = run_with_grads(causal_conv1d_chunk, inp, activation="silu")
        assert test[0].dtype == dtype and test[2]["x"].dtype == dtype
        assert_all_close(ref, test, atol=tol, rtol=tol, what=f"conv {dtype}")
