"""Chunked SSD (Mamba-2 scan) in pure PyTorch: O(T) work, chunk-parallel matmuls, exact resets.

Derivation (per head; ``a_t = dt_t * A`` is the log-decay; one chunk holds positions ``0..Q-1``
and ``S_in`` is the state entering it; ``seg[i, j] = sum_{k=j+1}^{i} a_k``, ``cum_i = sum_{k<=i} a_k``):

    S_i = exp(cum_i) S_in + sum_{j<=i} exp(seg[i, j]) dt_j x_j B_j^T
    y_i = exp(cum_i) S_in C_i + sum_{j<=i} exp(seg[i, j]) (C_i . B_j) dt_j x_j + D x_i

* intra-chunk ("diagonal block"): ``Y_diag = (L * (C B^T)) @ (dt x)`` with ``L = exp(seg)``
  (lower triangular, Q x Q): one batched matmul; ``C B^T`` is computed once per *group*.
* chunk states: ``states = (dt x * L[Q-1, :])^T @ B`` (the last row of ``L`` = decay to chunk end).
* inter-chunk recurrence, sequential over the T/Q chunks (O(T) in total):
  ``S_in[c+1] = exp(cum_{Q-1}[c]) S_in[c] + states[c]``.
* off-diagonal output: ``Y_off = exp(cum) * (C @ S_in^T)``.

Resets: a reset at ``r`` means no decay path crosses ``r``: ``L[i, j] = 0`` when a reset lies in
``(j, i]``, ``exp(cum_i) = 0`` once a reset occurred in the chunk at or before ``i``. We get these
exact zeros from a document mask (``_common.chunk_decays``) rather than ``-inf`` log-decays; the
segment sums are differences of a split fp64 cumsum, as exact as a masked cumsum. The tail is
padded with ``dt = 0`` (decay 1, no input), which leaves the final state unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._common import apply_reset_to_logdecay, check_reset, chunk_decays, chunk_doc_index, compute_dtype
from .naive import _check


class ChunkRecurrence(torch.autograd.Function):
    """The inter-chunk recurrence ``S_{c+1} = decay_chunk[c] * S_c + states[c]`` from ``S_0``.

    ``forward(states [b,c,g,r,p,n], decay_chunk [b,c,g,r], S0 [b,g,r,p,n]) -> (s_in, S_final)`` where
    ``s_in[:, c] = S_c`` is the state entering chunk ``c``. Written into one buffer forward and
    backward: as a Python loop under autograd it stacked the per-chunk states and, backward,
    stacked their gradients again (two full-size copies), through a few graph nodes per chunk.
    """

    @staticmethod
    def forward(ctx, states, decay_chunk, S0):
        nc = states.shape[1]
        s_in = torch.empty(states.shape, dtype=states.dtype, device=states.device)
        dc = decay_chunk[..., None, None]
        s_in[:, 0] = S0
        for c in range(nc - 1):
            torch.addcmul(states[:, c], dc[:, c], s_in[:, c], out=s_in[:, c + 1])
        S = torch.addcmul(states[:, nc - 1], dc[:, nc - 1], s_in[:, nc - 1])
        ctx.save_for_backward(s_in, decay_chunk)
        return s_in, S

    @staticmethod
    def backward(ctx, g_s_in, g_S):
        s_in, decay_chunk = ctx.saved_tensors
        nc = s_in.shape[1]
        dc = decay_chunk[..., None, None]
        g_states = torch.empty_like(s_in)
        g_dc = torch.empty_like(decay_chunk)
        gS = torch.zeros_like(s_in[:, 0]) if g_S is None else g_S
        for c in reversed(range(nc)):
            # S_{c+1} = dc[c] * S_c + states[c], with S_c = s_in[:, c]
            g_states[:, c] = gS
            g_dc[:, c] = (gS * s_in[:, c]).sum((-2, -1))
            gS = gS * dc[:, c]
            if g_s_in is not None:
                gS = gS + g_s_in[:, c]
        return g_states, g_dc, gS


def ssd_chunk(x, dt, A, B, C, D=None, initial_state=None, reset=None, chunk_size=64):
    """Chunked SSD; same contract as :func:`ssd_naive`. Returns ``(y in x.dtype, state fp32)``."""
    _check(x, dt, A, B, C)
    b, t, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    reset = check_reset(reset, b, t)
    cd = compute_dtype(x, dt, A, B, C, D, initial_state)
    q = int(chunk_size)
    if q < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if t == 0:
        S0 = x.new_zeros(b, h, p, n, dtype=cd) if initial_state is None else initial_state.to(cd)
        return x.new_zeros(b, 0, h, p), S0
    q = min(q, t)
    nc = -(-t // q)
    pad = nc * q - t

    xf, dtf, Bf, Cf = x.to(cd), dt.to(cd), B.to(cd), C.to(cd)
    la = apply_reset_to_logdecay(dtf * A.to(cd), reset)  # [b,t,h]
    xdt = xf * dtf[..., None]
    if pad:
        xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
        la = F.pad(la, (0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        if reset is not None:
            reset = F.pad(reset, (0, pad))
    doc = chunk_doc_index(reset, nc, q)  # [b,c,Q] or None
    if doc is not None:
        doc = doc[:, :, None, None, :]  # broadcast over [g, r]

    # Inputs stay in their natural layout [b, c, Q, g, r, p] (a view of [b, t, h, p]); B and C are
    # [b, c, g, Q, n] (views when G = 1). Every product shared by a group's heads folds the heads
    # into the matrix dimension ([(r p), Q] @ [Q, n]) instead of broadcasting B or C over the heads,
    # which would copy them once per head.
    xdt = xdt.reshape(b, nc, q, g, rep, p)
    Bc = Bf.view(b, nc, q, g, n).transpose(2, 3)
    Cc = Cf.view(b, nc, q, g, n).transpose(2, 3)
    la = la.view(b, nc, q, g, rep).permute(0, 1, 3, 4, 2)  # [b,c,g,r,Q]

    L, decay_in = chunk_decays(la, doc)  # [b,c,g,r,Q,Q], [b,c,g,r,Q]
    decay_chunk = decay_in[..., -1]  # [b,c,g,r]
    decay_out = L[..., -1, :]  # decay from position j to the chunk end, [b,c,g,r,Q]

    CB = Cc @ Bc.transpose(-1, -2)  # [b,c,g,Q,Q], once per group
    y_diag = (CB.unsqueeze(3) * L) @ xdt.permute(0, 1, 3, 4, 2, 5)  # intra-chunk, [b,c,g,r,Q,p]
    xw = xdt * decay_out.permute(0, 1, 4, 2, 3)[..., None]  # [b,c,Q,g,r,p]
    # computed as (B^T [n, Q] @ xw [Q, (r p)])^T: CPU BLAS is ~3x slower on the tall [(r p), n] result
    states = Bc.transpose(-1, -2) @ xw.view(b, nc, q, g, rep * p).transpose(2, 3)  # [b,c,g,n,(r p)]
    states = states.transpose(-1, -2).view(b, nc, g, rep, p, n)

    if initial_state is None:
        S0 = x.new_zeros(b, g, rep, p, n, dtype=cd)
    else:
        S0 = initial_state.to(cd).reshape(b, g, rep, p, n)
    s_in, S = ChunkRecurrence.apply(states, decay_chunk, S0)
    s_in = s_in.view(b, nc, g, rep * p, n)

    y_off = (Cc @ s_in.transpose(-1, -2)).view(b, nc, g, q, rep, p)  # inter-chunk, [b,c,g,Q,r,p]
    y = y_off * decay_in.permute(0, 1, 2, 4, 3)[..., None]
    # the sum takes y's layout, [b,c,Q,g,r,p] when G = 1: the final reshape is then free
    y = (y.transpose(2, 3) + y_diag.permute(0, 1, 4, 2, 3, 5)).reshape(b, nc * q, h, p)[:, :t]
    if D is not None:
        y = torch.addcmul(y, xf, D.to(cd)[:, None])
    return y.to(x.dtype), S.reshape(b, h, p, n)
