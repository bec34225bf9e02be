"""Chunked gated delta rule in pure PyTorch (WY / UT transform): O(T), chunk-parallel, exact resets.

Derivation (per head, FLA layout ``S [K, V]``; one chunk of Q tokens with entering state ``S0``;
``gam_i = sum_{k<=i} g_k`` within the chunk, ``seg[i, j] = sum_{k=j+1}^{i} g_k``; ``g = -inf`` at
a reset). Write the rule as ``S_i = exp(g_i) S_{i-1} + k_i u_i^T`` with the "pseudo-value"

    u_i = beta_i (v_i - (exp(g_i) S_{i-1})^T k_i).

Unrolling, ``S_i = exp(gam_i) S0 + sum_{j<=i} exp(seg[i, j]) k_j u_j^T``, so

    u_i + beta_i sum_{j<i} exp(seg[i, j]) (k_i . k_j) u_j = beta_i v_i - beta_i exp(gam_i) S0^T k_i

i.e. ``(I + A) U = beta V - (beta exp(gam) K) S0`` with the strictly lower triangular
``A[i, j] = beta_i exp(seg[i, j]) k_i . k_j``. With ``T = (I + A)^{-1}`` (unit lower triangular;
computed by one batched triangular solve -- the UT transform of the DeltaNet paper):

    U0 = T (beta V),   W = T (beta exp(gam) K),   U = U0 - W S0            (WY form)
    O  = scale * ( exp(gam) Q S0  +  ((Q K^T) * exp(seg) * tril) U )
    S_end = exp(gam_{Q-1}) S0 + (K * exp(seg[Q-1, :]))^T U

``U0, W`` and the masked ``Q K^T`` are computed for all chunks at once; only
``U_c = U0_c - W_c S`` and the state update run sequentially over the T/Q chunks. As in the SSD
chunk, every decay comes from the masked-cumsum ``segsum`` or a plain inclusive cumsum, so
``g = -inf`` (a reset) gives exact zeros without NaNs. The tail is padded with ``g = 0, beta = 0,
k = 0`` (no decay, no write), which leaves the final state unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import apply_reset_to_logdecay, check_reset, compute_dtype, segsum
from .naive import _check


def gdn_chunk(q, k, v, g, beta, scale=None, initial_state=None, reset=None, chunk_size=64):
    """Chunked gated delta rule; same contract as :func:`gdn_naive`."""
    _check(q, k, v, g, beta)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    reset = check_reset(reset, b, t)
    if scale is None:
        scale = dk**-0.5
    cd = compute_dtype(q, k, v, g, beta, initial_state)
    Q = int(chunk_size)
    if Q < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if t == 0:
        S0 = q.new_zeros(b, h, dk, dv, dtype=cd) if initial_state is None else initial_state.to(cd)
        return v.new_zeros(b, 0, h, dv), S0
    Q = min(Q, t)
    nc = -(-t // Q)
    pad = nc * Q - t

    gf = apply_reset_to_logdecay(g.to(cd), reset)
    qf, kf, vf, bf = q.to(cd), k.to(cd), v.to(cd), beta.to(cd)
    if pad:
        qf, kf, vf = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (qf, kf, vf))
        gf, bf = (F.pad(z, (0, 0, 0, pad)) for z in (gf, bf))

    # [b, h, c, Q, *]
    def chunks(z):
        return z.view(b, nc, Q, h, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)
    gc = gf.view(b, nc, Q, h).permute(0, 3, 1, 2)  # [b,h,c,Q]
    bc = bf.view(b, nc, Q, h).permute(0, 3, 1, 2)

    seg = segsum(gc)  # [b,h,c,Q,Q], -inf above the diagonal
    decay = torch.exp(seg)
    gam = torch.cumsum(gc, dim=-1)
    decay_in = torch.exp(gam)  # [b,h,c,Q]
    decay_chunk = decay_in[..., -1]  # [b,h,c]
    decay_out = decay[..., -1, :]  # [b,h,c,Q]

    kk = kc @ kc.transpose(-1, -2)
    strict = torch.tril(torch.ones(Q, Q, dtype=torch.bool, device=q.device), diagonal=-1)
    A = (bc[..., None] * kk * decay).masked_fill(~strict, 0.0)
    eye = torch.eye(Q, dtype=cd, device=q.device)
    rhs = torch.cat([bc[..., None] * vc, (bc * decay_in)[..., None] * kc], dim=-1)
    sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U0, W = sol[..., :dv], sol[..., dv:]  # [b,h,c,Q,V], [b,h,c,Q,K]

    P = (qc @ kc.transpose(-1, -2)) * decay  # decay is 0 above the diagonal
    kd = (kc * decay_out[..., None]).transpose(-1, -2)  # [b,h,c,K,Q]

    S = q.new_zeros(b, h, dk, dv, dtype=cd) if initial_state is None else initial_state.to(cd)
    s_in, us = [], []
    for c in range(nc):
        s_in.append(S)
        U = U0[:, :, c] - W[:, :, c] @ S
        us.append(U)
        S = decay_chunk[:, :, c, None, None] * S + kd[:, :, c] @ U
    s_in = torch.stack(s_in, dim=2)  # [b,h,c,K,V]
    U = torch.stack(us, dim=2)  # [b,h,c,Q,V]

    o = scale * ((qc * decay_in[..., None]) @ s_in + P @ U)  # [b,h,c,Q,V]
    o = o.permute(0, 2, 3, 1, 4).reshape(b, nc * Q, h, dv)[:, :t]
    return o.to(v.dtype), S
