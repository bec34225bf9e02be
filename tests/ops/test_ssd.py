"""SSD: chunk == naive (outputs, final state, every gradient incl. the initial state), resets,
step, dispatch, and == mamba_ssm's ssd_minimal_discrete where it imports."""

import pytest
import torch

from megasleep.ops import _peers
from megasleep.ops.ssd import ssd, ssd_chunk, ssd_naive, ssd_step
from megasleep.ops.testing import assert_all_close, make_ssd_inputs, random_reset, run_with_grads

# (b, t, h, p, g, n, chunk): T < chunk, T not a multiple, T a multiple, G = 1 / 2 / H
SHAPES = [
    (1, 5, 2, 3, 1, 4, 8),
    (2, 37, 4, 3, 2, 5, 8),
    (3, 32, 4, 2, 4, 3, 16),
    (2, 50, 6, 4, 3, 4, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}t{}h{}p{}g{}n{}q{}".format(*s))
@pytest.mark.parametrize("with_reset", [False, True], ids=["noreset", "reset"])
def test_chunk_matches_naive_fp64(shape, with_reset):
    b, t, h, p, g, n, q = shape
    inp = make_ssd_inputs(b, t, h, p, g, n, seed=t + h)
    reset = random_reset(b, t, seed=t) if with_reset else None
    ref = run_with_grads(ssd_naive, inp, reset=reset)
    test = run_with_grads(ssd_chunk, inp, reset=reset, chunk_size=q)
    assert_all_close(ref, test, atol=1e-10, rtol=1e-10, what=f"ssd chunk vs naive {shape} reset={with_reset}")


def test_chunk_matches_naive_fp32_no_init_no_D():
    inp = make_ssd_inputs(2, 45, 4, 8, 1, 16, dtype=torch.float32, seed=3, init=False, D=False)
    ref = run_with_grads(ssd_naive, inp)
    test = run_with_grads(ssd_chunk, inp, chunk_size=16)
    assert "D" not in test[2] and "initial_state" not in test[2]
    assert_all_close(ref, test, atol=1e-5, rtol=1e-4, what="ssd fp32")


def test_closed_form_single_token():
    """T=1 from an initial state: y = S0 exp(dt A) C + dt (B.C) x + D x (independent of our code)."""
    inp = make_ssd_inputs(2, 1, 4, 3, 2, 5, seed=1)
    x, dt, A, B, C, D, S0 = (inp[k] for k in ("x", "dt", "A", "B", "C", "D", "initial_state"))
    Bh, Ch = B.repeat_interleave(2, dim=2)[:, 0], C.repeat_interleave(2, dim=2)[:, 0]
    a = torch.exp(dt[:, 0] * A)
    S1 = a[..., None, None] * S0 + dt[:, 0, :, None, None] * x[:, 0, ..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", S1, Ch) + D[:, None] * x[:, 0]
    for fn in (ssd_naive, ssd_chunk):
        yy, SS = fn(**inp)
        torch.testing.assert_close(yy[:, 0], y)
        torch.testing.assert_close(SS, S1)


def test_reset_semantics():
    """A reset at t0 makes outputs from t0 on equal a fresh run on x[t0:], earlier outputs unchanged,
    and kills the gradient of everything before t0 from the later outputs."""
    b, t, t0 = 2, 40, 17
    inp = make_ssd_inputs(b, t, 4, 3, 2, 4, seed=5)
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[:, t0] = True
    y, S = ssd_chunk(**inp, reset=reset, chunk_size=8)
    y_no, _ = ssd_chunk(**inp, chunk_size=8)
    tail = {k: (v[:, t0:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    tail["initial_state"] = None
    y_tail, S_tail = ssd_chunk(**tail, chunk_size=8)
    torch.testing.assert_close(y[:, :t0], y_no[:, :t0])
    torch.testing.assert_close(y[:, t0:], y_tail)
    torch.testing.assert_close(S, S_tail)
    # a reset at t=0 makes the initial state irrelevant (exact zero gradient)
    r0 = torch.zeros(b, t, dtype=torch.bool)
    r0[:, 0] = True
    _, _, grads = run_with_grads(ssd_chunk, inp, reset=r0, chunk_size=8)
    assert torch.count_nonzero(grads["initial_state"]) == 0
    assert torch.isfinite(grads["A"]).all() and torch.isfinite(grads["dt"]).all()


def test_step_iterated_matches_naive():
    b, t, h, p, g, n = 2, 13, 4, 3, 2, 5
    inp = make_ssd_inputs(b, t, h, p, g, n, seed=7)
    y_ref, S_ref = ssd_naive(**inp)
    S = inp["initial_state"]
    ys = []
    for i in range(t):
        y, S = ssd_step(inp["x"][:, i], inp["dt"][:, i], inp["A"], inp["B"][:, i], inp["C"][:, i], inp["D"], S)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), y_ref)
    torch.testing.assert_close(S, S_ref)
    # state=None means zeros
    y0, _ = ssd_step(inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0], inp["C"][:, 0], None, None)
    yz, _ = ssd_naive(**{**inp, "D": None, "initial_state": None})
    torch.testing.assert_close(y0, yz[:, 0])


def test_chunk_continues_from_state():
    """Two calls with the state handed over == one call (what the sleep loop relies on)."""
    inp = make_ssd_inputs(2, 50, 4, 3, 2, 4, seed=9)
    y, S = ssd_chunk(**inp, chunk_size=16)
    a = {k: (v[:, :23] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, S1 = ssd_chunk(**a, chunk_size=16)
    rest = {k: (v[:, 23:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    rest["initial_state"] = S1
    y2, S2 = ssd_chunk(**rest, chunk_size=16)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(S2, S)


def test_bf16_io_dtypes():
    inp = make_ssd_inputs(2, 33, 4, 8, 1, 8, dtype=torch.bfloat16, seed=2)
    y, S = ssd_chunk(**inp, chunk_size=16)
    assert y.dtype == torch.bfloat16 and S.dtype == torch.float32
    y32, S32 = ssd_naive(**{k: (v.float() if v is not None else None) for k, v in inp.items()})
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(S, S32, atol=1e-4, rtol=1e-4)


def test_dispatch_on_cpu():
    inp = make_ssd_inputs(1, 20, 2, 3, 1, 4, seed=4)
    ref = ssd_chunk(**inp, chunk_size=8)
    for backend in ("auto", "torch"):
        out = ssd(**inp, backend=backend, chunk_size=8)
        torch.testing.assert_close(out[0], ref[0])
        torch.testing.assert_close(out[1], ref[1])
    with pytest.raises(RuntimeError, match="cuda"):
        ssd(**inp, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        ssd(**inp, backend="triton")
    with pytest.raises(ValueError, match="multiple"):
        ssd_chunk(**make_ssd_inputs(1, 4, 3, 2, 2, 4))


def test_matches_mamba_ssd_minimal():
    fn, why = _peers.ssd_minimal_discrete()
    if fn is None:
        pytest.skip(why)
    b, t, h, p, n, q = 2, 64, 4, 8, 16, 16
    inp = make_ssd_inputs(b, t, h, p, h, n, dtype=torch.float32, seed=11, D=False)

    def minimal(x, dt, A, B, C, D, initial_state):
        y, S = fn(x * dt[..., None], A * dt, B, C, q, initial_states=initial_state[:, None])
        return y, S

    ref = run_with_grads(minimal, inp)
    test = run_with_grads(ssd_chunk, inp, chunk_size=q)
    assert_all_close(ref, test, atol=1e-4, rtol=1e-4, what="ssd_chunk vs ssd_minimal_discrete")
