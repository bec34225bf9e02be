"""Gated delta rule: chunk == naive (outputs, final state, every gradient incl. the initial state),
resets, step, dispatch, and == fla's naive_recurrent_gated_delta_rule where it imports; also with beta in
(0, 2) (``gdn.allow_neg_eigval``: I - beta k k^T with a negative eigenvalue)."""

import pytest
import torch

from megasleep.ops import _peers
from megasleep.ops.gated_delta import gated_delta_rule, gdn_chunk, gdn_naive, gdn_step
from megasleep.ops.testing import assert_all_close, make_gdn_inputs, random_reset, run_with_grads

# (b, t, h, dk, dv, chunk): T < chunk, T not a multiple, a multiple, several chunks
SHAPES = [
    (1, 5, 2, 4, 3, 8),
    (2, 37, 3, 8, 5, 8),
    (3, 32, 2, 6, 4, 16),
    (2, 70, 2, 8, 8, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}t{}h{}k{}v{}q{}".format(*s))
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_chunk_matches_naive_fp64(shape, with_reset):
    b, t, h, dk, dv, q = shape
    inp = make_gdn_inputs(b, t, h, dk, dv, seed=t + dk)
    reset = random_reset(b, t, seed=t) if with_reset else None
    ref = run_with_grads(gdn_naive, inp, reset=reset)
    test = run_with_grads(gdn_chunk, inp, reset=reset, chunk_size=q)
    assert_all_close(ref, test, atol=1e-10, rtol=1e-10, what=f"gdn chunk vs naive {shape} reset={with_reset}")


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "b{}t{}h{}k{}v{}q{}".format(*s))
def test_chunk_matches_naive_negative_eigenvalues(shape):
    b, t, h, dk, dv, q = shape
    inp = make_gdn_inputs(b, t, h, dk, dv, seed=t + 1, beta_max=2.0)
    assert (inp["beta"] > 1).any() and (inp["beta"] < 1).any()  # both sides of the eigenvalue sign change
    reset = random_reset(b, t, seed=t)
    ref = run_with_grads(gdn_naive, inp, reset=reset)
    test = run_with_grads(gdn_chunk, inp, reset=reset, chunk_size=q)
    assert_all_close(ref, test, atol=1e-10, rtol=1e-10, what=f"gdn chunk vs naive, beta in (0, 2), {shape}")
    ref32 = run_with_grads(gdn_naive, {k: v.float() for k, v in inp.items()})
    test32 = run_with_grads(gdn_chunk, {k: v.float() for k, v in inp.items()}, chunk_size=q)
    assert_all_close(ref32, test32, atol=1e-5, rtol=1e-4, what=f"gdn fp32, beta in (0, 2), {shape}")


def test_chunk_matches_naive_fp32_scale_no_init():
    inp = make_gdn_inputs(2, 45, 2, 16, 8, dtype=torch.float32, seed=3, init=False)
    ref = run_with_grads(gdn_naive, inp, scale=0.3)
    test = run_with_grads(gdn_chunk, inp, scale=0.3, chunk_size=16)
    assert_all_close(ref, test, atol=1e-5, rtol=1e-4, what="gdn fp32")


def test_closed_form():
    """beta = 0: no writes, o_t = scale * exp(cumsum g)_t S0^T q_t (independent of our code)."""
    inp = make_gdn_inputs(2, 9, 2, 4, 3, seed=1)
    inp["beta"] = torch.zeros_like(inp["beta"])
    decay = torch.exp(torch.cumsum(inp["g"], 1))  # [b,t,h]
    o = torch.einsum("bthk,bhkv->bthv", inp["q"], inp["initial_state"]) * decay[..., None] * 4**-0.5
    for fn in (gdn_naive, gdn_chunk):
        oo, SS = fn(**inp, chunk_size=4) if fn is gdn_chunk else fn(**inp)
        torch.testing.assert_close(oo, o)
        torch.testing.assert_close(SS, inp["initial_state"] * decay[:, -1, :, None, None])
    # one write into a zero state: S = beta k v^T, o = scale * beta (q.k) v
    one = make_gdn_inputs(1, 1, 1, 4, 3, seed=2, init=False)
    oo, SS = gdn_chunk(**one)
    k, v, q, beta = one["k"][0, 0, 0], one["v"][0, 0, 0], one["q"][0, 0, 0], one["beta"][0, 0, 0]
    torch.testing.assert_close(SS[0, 0], beta * torch.outer(k, v))
    torch.testing.assert_close(oo[0, 0, 0], 0.5 * beta * (q @ k) * v)


def test_reset_semantics():
    b, t, t0 = 2, 40, 19
    inp = make_gdn_inputs(b, t, 2, 8, 4, seed=5)
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[:, t0] = True
    o, S = gdn_chunk(**inp, reset=reset, chunk_size=8)
    o_no, _ = gdn_chunk(**inp, chunk_size=8)
    tail = {k: (v[:, t0:] if k != "initial_state" else None) for k, v in inp.items()}
    o_tail, S_tail = gdn_chunk(**tail, chunk_size=8)
    torch.testing.assert_close(o[:, :t0], o_no[:, :t0])
    torch.testing.assert_close(o[:, t0:], o_tail)
    torch.testing.assert_close(S, S_tail)
    r0 = torch.zeros(b, t, dtype=torch.bool)
    r0[:, 0] = True
    _, _, grads = run_with_grads(gdn_chunk, inp, reset=r0, chunk_size=8)
    assert torch.count_nonzero(grads["initial_state"]) == 0
    assert all(torch.isfinite(gr).all() for gr in grads.values())


@pytest.mark.parametrize("beta_max", [1.0, 2.0])
def test_step_iterated_matches_naive(beta_max):
    b, t = 2, 13
    inp = make_gdn_inputs(b, t, 3, 4, 5, seed=7, beta_max=beta_max)
    o_ref, S_ref = gdn_naive(**inp, scale=0.7)
    S = inp["initial_state"]
    os = []
    for i in range(t):
        o, S = gdn_step(*(inp[k][:, i] for k in ("q", "k", "v", "g", "beta")), 0.7, S)
        os.append(o)
    torch.testing.assert_close(torch.stack(os, 1), o_ref)
    torch.testing.assert_close(S, S_ref)


def test_chunk_continues_from_state():
    inp = make_gdn_inputs(2, 50, 2, 8, 4, seed=9)
    o, S = gdn_chunk(**inp, chunk_size=16)
    a = {k: (v[:, :23] if k != "initial_state" else v) for k, v in inp.items()}
    o1, S1 = gdn_chunk(**a, chunk_size=16)
    rest = {k: (v[:, 23:] if k != "initial_state" else S1) for k, v in inp.items()}
    o2, S2 = gdn_chunk(**rest, chunk_size=16)
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(S2, S)


def test_bf16_io_dtypes():
    inp = make_gdn_inputs(2, 33, 2, 16, 16, dtype=torch.bfloat16, seed=2)
    o, S = gdn_chunk(**inp, chunk_size=16)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o32, S32 = gdn_naive(**{k: v.float() for k, v in inp.items()})
    torch.testing.assert_close(o.float(), o32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(S, S32, atol=1e-4, rtol=1e-4)


def test_dispatch_on_cpu():
    inp = make_gdn_inputs(1, 20, 2, 4, 3, seed=4)
    ref = gdn_chunk(**inp, chunk_size=8)
    for backend in ("auto", "torch"):
        out = gated_delta_rule(**inp, backend=backend, chunk_size=8)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(RuntimeError, match="cuda"):
        gated_delta_rule(**inp, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        gated_delta_rule(**inp, backend="fla")


def _fla(fn, q, k, v, g, beta, initial_state, reset=None):
    assert reset is None
    o, S = fn(q, k, v, beta, g, initial_state=initial_state, output_final_state=True)
    return o, S


@pytest.mark.parametrize("t,beta_max", [(37, 1.0), (64, 1.0), (37, 2.0)])
def test_matches_fla_naive_recurrent(t, beta_max):
    fn, why = _peers.fla_naive_recurrent_gated_delta_rule()
    if fn is None:
        pytest.skip(why)
    inp = make_gdn_inputs(2, t, 2, 16, 8, dtype=torch.float32, seed=t, beta_max=beta_max)
    ref = run_with_grads(lambda **kw: _fla(fn, **kw), inp)
    test = run_with_grads(gdn_chunk, inp, chunk_size=16)
    assert_all_close(ref, test, atol=1e-5, rtol=1e-4, what="gdn_chunk vs fla naive_recurrent")
