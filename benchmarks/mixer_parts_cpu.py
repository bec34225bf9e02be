"""CPU fwd+bwd of the Mamba-2 mixer's hand-written parts against their plain-autograd equivalents,
timed side by side in one run (interleaved, minimum over ``--repeats``), at the mixer row's shape of
``ops_cpu.py`` (B=2 T=512 d_model=256: conv channels 640, SSD heads 8 x 64, 8 chunks of 64).

* conv: ``causal_conv1d_chunk`` (channels-last, SiLU fused, hand-written backward) vs depthwise
  ``F.conv1d`` over ``cat(initial_state, x)`` + ``F.silu`` under autograd, both fed ``x`` as the
  mixer does (a transposed slice of the input projection's output); ours also with document resets;
* gated norm: ``GatedRMSNormFn`` vs ``gated_rms_norm_reference`` (plain autograd);
* segment decays: ``chunk_decays`` vs the masked-cumsum segment sum + exp + mask under autograd.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mixer_parts_cpu.py --repeats 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ops_cpu import Row, format_table, timed_pair  # noqa: E402

from megasleep.models.norm import GatedRMSNormFn, gated_rms_norm_reference  # noqa: E402
from megasleep.ops._common import chunk_decays  # noqa: E402
from megasleep.ops.conv import causal_conv1d_chunk  # noqa: E402
from megasleep.ops.testing import random_reset  # noqa: E402


def _ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms"


def _conv_autograd(x, weight, bias, initial_state, reset, activation):
    xs = torch.cat([initial_state, x], dim=-1)
    return F.silu(F.conv1d(xs, weight[:, None], bias, groups=x.shape[1])), None


def bench_conv(a) -> list[Row]:
    b, t, d, w = 2, 512, 640, 4
    proj = torch.randn(b, t, 1160)
    weight, bias = (torch.randn(d, w) * 0.5).requires_grad_(), torch.randn(d).requires_grad_()
    init = torch.randn(b, d, w - 1).requires_grad_()

    def step(fn, reset):
        def run():
            p = proj.clone().requires_grad_()
            out, _ = fn(p[..., 512: 512 + d].transpose(1, 2), weight, bias, init, reset, "silu")
            out.transpose(1, 2).square().mean().backward()
        return run

    rows = []
    t_ours, t_ref = timed_pair(step(causal_conv1d_chunk, None), step(_conv_autograd, None), a.repeats)
    rows.append(Row("causal conv + SiLU vs F.conv1d + F.silu autograd (fwd+bwd)", f"B={b} T={t} D={d} W={w}",
                    f"ours {_ms(t_ours)} / autograd {_ms(t_ref)}", t_ref / t_ours))
    # F.conv1d has no document resets: the peer runs without them (what packed training costs extra)
    reset = random_reset(b, t, p=0.01, seed=0)
    t_ours, t_ref = timed_pair(step(causal_conv1d_chunk, reset), step(_conv_autograd, None), a.repeats)
    rows.append(Row("causal conv + SiLU with resets vs F.conv1d + F.silu without (fwd+bwd)",
                    f"B={b} T={t} D={d} W={w}, {int(reset.sum())} resets", f"ours {_ms(t_ours)} / autograd "
                    f"{_ms(t_ref)}", t_ref / t_ours))
    return rows


def bench_norm(a) -> list[Row]:
    b, t, d = 2, 512, 512
    y0, z0, weight = torch.randn(b, t, d), torch.randn(b, t, d), torch.randn(d).requires_grad_()

    def step(fn):
        def run():
            y, z = y0.clone().requires_grad_(), z0.clone().requires_grad_()
            fn(y, z, weight, 1e-5, None, False).square().mean().backward()
        return run

    t_ours, t_ref = timed_pair(step(GatedRMSNormFn.apply), step(gated_rms_norm_reference), a.repeats)
    return [Row("gated RMSNorm vs plain autograd (fwd+bwd)", f"B={b} T={t} D={d}",
                f"ours {_ms(t_ours)} / autograd {_ms(t_ref)}", t_ref / t_ours)]


def _decays_masked_cumsum(la, doc):
    """The usual stable segment sum: a cumsum over the strictly-lower-masked Q x Q matrix, then exp
    and the causal mask (finite throughout, as ``segsum`` but without its ``-inf`` slow path)."""
    q = la.shape[-1]
    strict = torch.tril(torch.ones(q, q, dtype=la.dtype), diagonal=-1)
    seg = torch.cumsum(la.unsqueeze(-1) * strict, dim=-2)
    return torch.exp(seg) * torch.tril(torch.ones(q, q, dtype=la.dtype)), None


def bench_decays(a) -> list[Row]:
    la0 = -torch.rand(2, 8, 1, 8, 64) * 0.5

    def step(fn):
        def run():
            la = la0.clone().requires_grad_()
            fn(la, None)[0].square().sum().backward()
        return run

    t_ours, t_ref = timed_pair(step(chunk_decays), step(_decays_masked_cumsum), a.repeats)
    return [Row("chunk segment decays vs masked cumsum (fwd+bwd)", "[2, 8 chunks, 8 heads, 64 x 64]",
                f"ours {_ms(t_ours)} / masked cumsum {_ms(t_ref)}", t_ref / t_ours)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = bench_conv(a) + bench_norm(a) + bench_decays(a)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, repeats={a.repeats} "
          "(min of interleaved runs)\n")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
