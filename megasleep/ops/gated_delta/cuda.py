"""Gated delta rule on CUDA through fla's Triton kernels (imported lazily via ``_peers``).

Resets are exact: the batch is flattened to one row and cut into documents with ``cu_seqlens``;
each row's first document starts from that row's initial state, every other document from zeros,
and each row's final state is the final state of its last document.
"""

from __future__ import annotations

import torch

from .. import _peers


def _varlen_layout(reset: torch.Tensor):
    """(cu_seqlens int64 [N+1], first_doc [B] indices into N, last_doc [B]), docs cut at row ends and resets."""
    b, t = reset.shape
    starts = reset.clone()
    starts[:, 0] = True
    flat = starts.reshape(-1)
    begin = torch.nonzero(flat, as_tuple=False).squeeze(-1)  # one host sync
    cu = torch.cat([begin, begin.new_tensor([b * t])]).to(torch.long)
    n_per_row = starts.sum(dim=1)
    first = torch.cumsum(n_per_row, 0) - n_per_row
    last = first + n_per_row - 1
    return cu, first, last


def gdn_cuda(q, k, v, g, beta, scale=None, initial_state=None, reset=None, chunk_size=64):
    fn, why = _peers.fla_chunk_gated_delta_rule()
    if fn is None:
        raise RuntimeError(f"gated_delta_rule backend='cuda' unavailable: {why}")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    kw = {}
    if chunk_size in (16, 32, 64) and chunk_size != 64:
        kw["chunk_size"] = chunk_size
    g = g.float()
    if reset is None or t == 0:
        init = initial_state.float().contiguous() if initial_state is not None else None
        o, final = fn(q, k, v, g, beta, scale=scale, initial_state=init, output_final_state=True, **kw)
        return o.to(v.dtype), final.float()
    cu, first, last = _varlen_layout(reset)
    n = cu.numel() - 1
    init = None
    if initial_state is not None:
        init = initial_state.new_zeros(n, h, dk, dv, dtype=torch.float32)
        keep = (~reset[:, 0]).to(torch.float32)[:, None, None, None]
        init = init.index_copy(0, first, initial_state.float() * keep)
    flat = [z.reshape(1, b * t, *z.shape[2:]) for z in (q, k, v, g, beta)]
    o, final = fn(*flat, scale=scale, initial_state=init, output_final_state=True, cu_seqlens=cu, **kw)
    return o.reshape(b, t, h, dv).to(v.dtype), final.float().index_select(0, last)


def gdn_step_cuda(q, k, v, g, beta, scale, state):
    """``fused_recurrent_gated_delta_rule`` on one token (forward only)."""
    fn, why = _peers.fla_fused_recurrent_gated_delta_rule()
    if fn is None:
        raise RuntimeError(f"gdn_step backend='cuda' unavailable: {why}")
    b, h, dk = q.shape
    init = state.float().contiguous() if state is not None else None
    o, final = fn(
        q[:, None], k[:, None], v[:, None], g=g[:, None].float(), beta=beta[:, None], scale=scale,
        initial_state=init, output_final_state=True,
    )
    return o[:, 0].to(v.dtype), final.float()
