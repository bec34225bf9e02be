"""Chunked gated delta rule in pure PyTorch (WY / UT transform): O(T), chunk-parallel, exact resets.

Derivation (per head, FLA layout ``S [K, V]``; one chunk of Q tokens with entering state ``S0``;
``gam_i = sum_{k<=i} g_k`` within the chunk, ``seg[i, j] = sum_{k=j+1}^{i} g_k``). Write the rule
as ``S_i = exp(g_i) S_{i-1} + k_i u_i^T`` with the "pseudo-value"

    u_i = beta_i (v_i - (exp(g_i) S_{i-1})^T k_i).

Unrolling, ``S_i = exp(gam_i) S0 + sum_{j<=i} exp(seg[i, j]) k_j u_j^T``, hence

    u_i + beta_i sum_{j<i} exp(seg[i, j]) (k_i . k_j) u_j = beta_i v_i - beta_i exp(gam_i) S0^T k_i

i.e. ``(I + A) U = beta V - (beta exp(gam) K) S0`` with the strictly lower triangular
``A[i, j] = beta_i exp(seg[i, j]) k_i . k_j``. With ``T = (I + A)^{-1}`` (unit lower triangular;
here two batched triangular solves -- the UT transform of the DeltaNet paper):

    U0 = T (beta V),   W = T (beta exp(gam) K),   U = U0 - W S0            (WY form)
    O  = scale * ( exp(gam) Q S0  +  ((Q K^T) * exp(seg) * tril) U )
    S_end = exp(gam_{Q-1}) S0 + (K * exp(seg[Q-1, :]))^T U

``U0, W`` and the masked ``Q K^T`` are computed for all chunks at once; only ``U_c = U0_c - W_c S``
and ``S <- exp(gam_{Q-1}) S + Kd_c^T U_c`` run sequentially over the T/Q chunks (O(T) in total).

Resets: a reset at ``r`` means no decay path crosses ``r``. ``_common.chunk_decays`` builds
``exp(seg)`` / ``exp(gam)`` from exact segment sums and zeroes every entry that crosses a reset with a
document mask -- exact zeros, finite gradients, no ``-inf``. The tail is padded with ``g = 0,
beta = 0, k = 0`` (no decay, no write), which leaves the final state unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import apply_reset_to_logdecay, check_reset, chunk_decays, chunk_doc_index, compute_dtype
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
        if reset is not None:
            reset = F.pad(reset, (0, pad))
    doc = chunk_doc_index(reset, nc, Q)
    if doc is not None:
        doc = doc[:, None]  # [b,1,c,Q], broadcast over heads

    # [b, h, c, Q, *], contiguous once instead of a hidden copy in every matmul that reads them
    def chunks(z):
        return z.view(b, nc, Q, h, -1).permute(0, 3, 1, 2, 4).contiguous()

    qc, kc, vc = chunks(qf), chunks(kf), chunks(vf)
    gc = gf.view(b, nc, Q, h).permute(0, 3, 1, 2)  # [b,h,c,Q]
    bc = bf.view(b, nc, Q, h).permute(0, 3, 1, 2)

    decay, decay_in = chunk_decays(gc, doc)  # [b,h,c,Q,Q] (0 above the diagonal), [b,h,c,Q]
    # I + A: solve_triangular(unitriangular=True) reads only the strict lower triangle, so the
    # diagonal and upper part of this matrix are never used (nor differentiated)
    # (beta and scale are folded into the [Q, K] operands, not applied to the Q x Q products)
    kb = kc * bc[..., None]
    IA = (kb @ kc.transpose(-1, -2)) * decay
    U0 = torch.linalg.solve_triangular(IA, vc * bc[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(IA, kb * decay_in[..., None], upper=False, unitriangular=True)

    qs = qc * scale
    P = (qs @ kc.transpose(-1, -2)) * decay
    kd = (kc * decay[..., -1, :, None]).transpose(-1, -2)  # [b,h,c,K,Q]
    dch = decay_in[..., -1, None, None]  # [b,h,c,1,1]

    bh = b * h
    S = q.new_zeros(bh, dk, dv, dtype=cd) if initial_state is None else initial_state.to(cd).reshape(bh, dk, dv)
    s_in, us = [], []
    # unbind (not indexing) so that autograd does not materialise a full zero tensor per chunk
    for u0, w, dc, kdc in zip(U0.unbind(2), W.unbind(2), dch.unbind(2), kd.unbind(2)):
        s_in.append(S)
        U = torch.baddbmm(u0.reshape(bh, Q, dv), w.reshape(bh, Q, dk), S, alpha=-1.0)
        us.append(U)
        S = torch.baddbmm(dc.reshape(bh, 1, 1) * S, kdc.reshape(bh, dk, Q), U)
    s_in = torch.stack(s_in, dim=1).view(b, h, nc, dk, dv)
    U = torch.stack(us, dim=1).view(b, h, nc, Q, dv)

    o = (qs * decay_in[..., None]) @ s_in + P @ U  # [b,h,c,Q,V]
    o = o.permute(0, 2, 3, 1, 4).reshape(b, nc * Q, h, dv)[:, :t]
    return o.to(v.dtype), S.view(b, h, dk, dv)
