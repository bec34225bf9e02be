"""Token-by-token reference of the SSD (Mamba-2) scan, and the single-token step.

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        (S_t: [P, N] per head)
    y_t = S_t C_t + D * x_t

Layouts: ``x [B,T,H,P]``, ``dt [B,T,H]`` (positive, softplus + bias already applied), ``A [H]``
(negative), ``B, C [B,T,G,N]`` (head ``h`` reads group ``h // (H // G)``), ``D [H]`` or None,
state ``[B,H,P,N]``. ``reset[b, t]`` zeroes the state before token ``t`` is absorbed.
"""

from __future__ import annotations

import torch

from .._common import check_reset, compute_dtype


def _check(x, dt, A, B, C):
    if x.dim() != 4:
        raise ValueError(f"x must be [B,T,H,P], got shape {list(x.shape)}")
    b, t, h, _ = x.shape
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be [B,T,H] = {[b, t, h]}, got {list(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [H] = [{h}], got {list(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"B and C must be [B,T,G,N] with B,T = {b},{t}; got {list(B.shape)}, {list(C.shape)}")
    if h % B.shape[2] != 0:
        raise ValueError(f"number of heads H={h} must be a multiple of the number of groups G={B.shape[2]}")


def _update(S, x, dt, A, B, C, D):
    """One token. S [b,h,p,n], x [b,h,p], dt [b,h], B/C [b,h,n] (already per head)."""
    a = torch.exp(dt * A)  # [b,h]
    S = a[..., None, None] * S + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", S, C)
    if D is not None:
        y = y + D[:, None] * x
    return y, S


def ssd_naive(x, dt, A, B, C, D=None, initial_state=None, reset=None):
    """Reference recurrence (a Python loop over T). Returns ``(y [B,T,H,P] in x.dtype, state fp32)``."""
    _check(x, dt, A, B, C)
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    reset = check_reset(reset, b, t)
    cd = compute_dtype(x, dt, A, B, C, D, initial_state)
    rep = h // g
    xf, dtf, Af = x.to(cd), dt.to(cd), A.to(cd)
    Bh = B.to(cd).repeat_interleave(rep, dim=2)
    Ch = C.to(cd).repeat_interleave(rep, dim=2)
    Df = D.to(cd) if D is not None else None
    if initial_state is None:
        S = x.new_zeros(b, h, p, n, dtype=cd)
    else:
        S = initial_state.to(cd)
    ys = []
    for i in range(t):
        if reset is not None:
            S = torch.where(reset[:, i, None, None, None], torch.zeros_like(S), S)
        y, S = _update(S, xf[:, i], dtf[:, i], Af, Bh[:, i], Ch[:, i], Df)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(b, 0, h, p)
    return y.to(x.dtype), S


def ssd_step_torch(x, dt, A, B, C, D, state):
    """One decoding step in PyTorch: x [B,H,P], dt [B,H], B/C [B,G,N], state [B,H,P,N] (or None)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    cd = compute_dtype(x, dt, A, B, C, D, state)
    rep = h // g
    S = x.new_zeros(b, h, p, n, dtype=cd) if state is None else state.to(cd)
    y, S = _update(
        S,
        x.to(cd),
        dt.to(cd),
        A.to(cd),
        B.to(cd).repeat_interleave(rep, dim=1),
        C.to(cd).repeat_interleave(rep, dim=1),
        D.to(cd) if D is not None else None,
    )
    return y.to(x.dtype), S
