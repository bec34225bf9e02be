"""Token-by-token reference of the gated delta rule (FLA layout), and the single-token step.

Per head, state ``S [K, V]`` (the transpose of the ``S`` written in docs/sleep.md#mixers):

    S_t = exp(g_t) S_{t-1}
    S_t = S_t + k_t (beta_t (v_t - S_t^T k_t))^T
    o_t = scale * S_t^T q_t

identical to ``fla.ops.gated_delta_rule.naive_recurrent_gated_delta_rule`` (which takes
``beta, g`` in the other order). ``q, k [B,T,H,K]`` (L2-normalised by the caller), ``v [B,T,H,V]``,
``g [B,T,H]`` log-decay <= 0, ``beta [B,T,H]``, ``scale`` defaults to ``K ** -0.5``.
"""

from __future__ import annotations

import torch

from .._common import check_reset, compute_dtype


def _check(q, k, v, g, beta):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B,T,H,K] with equal shapes, got {list(q.shape)}, {list(k.shape)}")
    b, t, h, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"v must be [B,T,H,V] with B,T,H = {b},{t},{h}, got {list(v.shape)}")
    for name, z in (("g", g), ("beta", beta)):
        if z.shape != (b, t, h):
            raise ValueError(f"{name} must be [B,T,H] = {[b, t, h]}, got {list(z.shape)}")


def _update(S, q, k, v, g, beta, scale):
    """One token. S [b,h,K,V], q/k [b,h,K], v [b,h,V], g/beta [b,h]."""
    S = S * torch.exp(g)[..., None, None]
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k[..., :, None] * u[..., None, :]
    o = scale * torch.einsum("bhkv,bhk->bhv", S, q)
    return o, S


def gdn_naive(q, k, v, g, beta, scale=None, initial_state=None, reset=None):
    """Reference recurrence (a Python loop over T). Returns ``(o [B,T,H,V] in v.dtype, state fp32)``."""
    _check(q, k, v, g, beta)
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    reset = check_reset(reset, b, t)
    if scale is None:
        scale = dk**-0.5
    cd = compute_dtype(q, k, v, g, beta, initial_state)
    qf, kf, vf, gf, bf = (z.to(cd) for z in (q, k, v, g, beta))
    S = q.new_zeros(b, h, dk, dv, dtype=cd) if initial_state is None else initial_state.to(cd)
    os = []
    for i in range(t):
        if reset is not None:
            S = torch.where(reset[:, i, None, None, None], torch.zeros_like(S), S)
        o, S = _update(S, qf[:, i], kf[:, i], vf[:, i], gf[:, i], bf[:, i], scale)
        os.append(o)
    o = torch.stack(os, dim=1) if os else vf.new_zeros(b, 0, h, dv)
    return o.to(v.dtype), S


def gdn_step_torch(q, k, v, g, beta, scale, state):
    """One decoding step: q/k [B,H,K], v [B,H,V], g/beta [B,H], state [B,H,K,V] (or None)."""
    b, h, dk = q.shape
    dv = v.shape[-1]
    if scale is None:
        scale = dk**-0.5
    cd = compute_dtype(q, k, v, g, beta, state)
    S = q.new_zeros(b, h, dk, dv, dtype=cd) if state is None else state.to(cd)
    o, S = _update(S, q.to(cd), k.to(cd), v.to(cd), g.to(cd), beta.to(cd), scale)
    return o.to(v.dtype), S
