"""SSD on CUDA through mamba_ssm's Triton kernels (imported lazily via ``megasleep.ops._peers``)."""

from __future__ import annotations

import torch

from .. import _peers


def _resets_to_seq_idx(reset, initial_state):
    """mamba's ``seq_idx`` (int32 [B,T], starts at 0 so the initial state belongs to sequence 0)."""
    if reset is None:
        return None, initial_state
    r = reset.clone()
    if initial_state is not None:
        initial_state = initial_state * (~r[:, 0]).to(initial_state.dtype)[:, None, None, None]
    r[:, 0] = False
    return torch.cumsum(r, dim=1, dtype=torch.int32).contiguous(), initial_state


def ssd_cuda(x, dt, A, B, C, D=None, initial_state=None, reset=None, chunk_size=64):
    """``mamba_chunk_scan_combined`` with ``initial_states`` / ``return_final_states``; resets as
    ``seq_idx`` (the kernel zeroes the carried state where ``seq_idx`` changes, also mid-chunk, and
    routes the initial-state gradient only through sequence 0)."""
    fn, why = _peers.mamba_chunk_scan_combined()
    if fn is None:
        raise RuntimeError(f"SSD backend='cuda' unavailable: {why}")
    # the chunk size only trades speed; the Triton kernels want a power of two >= 16
    chunk_size = max(16, 1 << (max(int(chunk_size), 1) - 1).bit_length())
    seq_idx, init = _resets_to_seq_idx(reset, initial_state)
    if init is not None:
        init = init.float().contiguous()
    y, final = fn(
        x.contiguous(),
        dt.contiguous(),
        A.float().contiguous(),
        B.contiguous(),
        C.contiguous(),
        chunk_size,
        D=D.contiguous() if D is not None else None,
        initial_states=init,
        seq_idx=seq_idx,
        return_final_states=True,
    )
    return y.to(x.dtype), final.float()


def ssd_step_cuda(x, dt, A, B, C, D, state):
    """``selective_state_update`` (in place on a copy of ``state``); A / dt / D broadcast per head dim."""
    fn, why = _peers.selective_state_update()
    if fn is None:
        raise RuntimeError(f"SSD step backend='cuda' unavailable: {why}")
    b, h, p = x.shape
    n = B.shape[-1]
    S = torch.zeros(b, h, p, n, device=x.device, dtype=torch.float32) if state is None else state.float().clone()
    A_ = A.float()[:, None, None].expand(h, p, n)
    dt_ = dt[..., None].expand(b, h, p)
    D_ = D[:, None].expand(h, p) if D is not None else None
    # zero dt_bias, broadcast like A and dt: the kernel's "tied head dim" fast path reads
    # dt_bias.stride() unconditionally once A and dt are broadcast (it crashes on None)
    dt_bias = torch.zeros((), device=x.device, dtype=torch.float32).expand(h, p)
    y = fn(S, x, dt_, A_, B, C, D=D_, dt_bias=dt_bias, dt_softplus=False)
    return y.to(x.dtype), S
