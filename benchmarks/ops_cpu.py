"""CPU benchmarks of the megasleep kernels against the peer references, measured side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ops_cpu.py            # all rows, markdown table
    .venv/bin/python benchmarks/ops_cpu.py --only ssd gdn --repeats 7

Rows:
* ``ssd``: ``megasleep.ops.ssd_chunk`` (forward + backward, with an initial state, gradients to
  every input) vs ``mamba_ssm.modules.ssd_minimal.ssd_minimal_discrete`` doing the same. Goal >= 1.0x.
* ``gdn``: ``megasleep.ops.gdn_chunk`` vs the chunked pure-torch peers, FLA's
  ``naive_chunk_gated_delta_rule`` and transformers' (Qwen3-Next) ``torch_chunk_gated_delta_rule``,
  at T=2048, forward+backward with initial and final state. Goal >= 1.0x.
* ``sleep``: tiny-model training step at N=2,4 vs N=1 and its peak memory (benchmarks/sleep_cost.py).
* ``mixer``, ``hf_step``: whole Mamba-2 mixer and same-size training steps against Hugging Face
  models (benchmarks/hf_peers.py).

The two sides of a row are timed alternately (interleaved) and the minimum over ``--repeats`` is
reported, so background load hurts both sides alike. More rows (model-level timings) plug in by
adding a function ``(args) -> list[Row]`` to ``BENCHES``.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclasses.dataclass
class Row:
    """One line of the table. ``value`` is compared with ``goal`` (``>=`` if higher_is_better)."""

    name: str
    config: str
    measured: str  # human-readable, e.g. "ours 12.1 ms | ref 40.3 ms"
    value: float
    goal: float | None = None
    higher_is_better: bool = True
    unit: str = "x"

    @property
    def met(self) -> str:
        if self.goal is None:
            return "-"
        ok = self.value >= self.goal if self.higher_is_better else self.value <= self.goal
        return "yes" if ok else "NO"

    def goal_str(self) -> str:
        if self.goal is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.goal:g}{self.unit}"


def timed_pair(fa: Callable[[], object], fb: Callable[[], object], repeats: int, warmup: int = 1):
    """Interleaved timing of two callables; returns (min seconds of fa, min seconds of fb)."""
    for _ in range(warmup):
        fa()
        fb()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - t0)
    return min(ta), min(tb)


def fwd_bwd(fn: Callable, inputs: dict, seed: int = 0, **kwargs) -> Callable[[], None]:
    """A closure running ``fn(**inputs)`` -> (out, state) and backpropagating fixed random cotangents
    into every floating input (cotangents are drawn once, outside the timed region)."""
    leaves = {k: (v.detach().clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    with torch.no_grad():
        out, state = fn(**inputs, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=gen).to(out.dtype)
    gs = torch.randn(state.shape, generator=gen).to(state.dtype)

    def run():
        for v in leaves.values():
            if v is not None:
                v.grad = None
        o, s = fn(**leaves, **kwargs)
        torch.autograd.backward([o, s], [go, gs])

    return run


def fwd_only(fn: Callable, inputs: dict, **kwargs) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn(**inputs, **kwargs)

    return run


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


# --------------------------------------------------------------------------------------- rows
def bench_ssd(args) -> list[Row]:
    from megasleep.ops import _peers, ssd_chunk
    from megasleep.ops.testing import make_ssd_inputs

    minimal, why = _peers.ssd_minimal_discrete()
    b, t, h, p, n, q = args.ssd_batch, args.ssd_T, args.ssd_heads, args.ssd_headdim, args.ssd_dstate, args.chunk_size
    cfg = f"B={b} T={t} H={h} P={p} N={n} G=1 Q={q} fp32"
    if minimal is None:
        return [Row("SSD chunk vs ssd_minimal_discrete (fwd+bwd)", cfg, f"skipped: {why}", float("nan"), 1.0)]
    inp = make_ssd_inputs(b, t, h, p, 1, n, dtype=torch.float32, seed=0, D=False)
    # ssd_minimal has no groups: hand it B, C already expanded to H heads, as a caller would
    ref_inp = dict(inp, B=inp["B"].expand(b, t, h, n).contiguous(), C=inp["C"].expand(b, t, h, n).contiguous())

    def ref(x, dt, A, B, C, D, initial_state):
        return minimal(x * dt[..., None], A * dt, B, C, q, initial_states=initial_state[:, None])

    ours, theirs = timed_pair(fwd_bwd(ssd_chunk, inp, chunk_size=q), fwd_bwd(ref, ref_inp), args.repeats)
    return [
        Row(
            "SSD chunk vs ssd_minimal_discrete (fwd+bwd, init state)",
            cfg,
            f"ours {_ms(ours)} / ref {_ms(theirs)}",
            theirs / ours,
            1.0,
        )
    ]


def bench_gdn(args) -> list[Row]:
    """Our chunked GDN vs the chunked pure-torch peers (fwd+bwd, initial state, final state)."""
    from megasleep.ops import _peers, gdn_chunk
    from megasleep.ops.testing import make_gdn_inputs

    b, t, h, d, q = args.gdn_batch, args.gdn_T, args.gdn_heads, args.gdn_headdim, args.chunk_size
    cfg = f"B={b} T={t} H={h} K=V={d} Q={q} fp32"
    inp = make_gdn_inputs(b, t, h, d, d, dtype=torch.float32, seed=0)
    fla, fla_why = _peers.fla_naive_chunk_gated_delta_rule()
    hf, hf_why = _peers.hf_torch_chunk_gated_delta_rule()

    def fla_ref(q, k, v, g, beta, initial_state):
        return fla(q, k, v, g, beta, chunk_size=args.chunk_size, initial_state=initial_state,
                   output_final_state=True)

    def hf_ref(q, k, v, g, beta, initial_state):
        # transformers scales q by K^-1/2 inside, like ours and FLA's default
        return hf(q, k, v, g, beta, chunk_size=args.chunk_size, initial_state=initial_state,
                  output_final_state=True)

    rows = []
    for name, ref, why in (("fla naive_chunk_gated_delta_rule", fla_ref if fla else None, fla_why),
                           ("transformers torch_chunk_gated_delta_rule", hf_ref if hf else None, hf_why)):
        label = f"GDN chunk vs {name} (fwd+bwd, init state)"
        if ref is None:
            rows.append(Row(label, cfg, f"skipped: {why}", float("nan"), 1.0))
            continue
        ours, theirs = timed_pair(fwd_bwd(gdn_chunk, inp, chunk_size=q), fwd_bwd(ref, inp), args.repeats)
        rows.append(Row(label, cfg, f"ours {_ms(ours)} / ref {_ms(theirs)}", theirs / ours, 1.0))
    return rows


def bench_mixer(args) -> list[Row]:
    import hf_peers

    return hf_peers.bench_mixer(args)


def bench_hf_steps(args) -> list[Row]:
    import hf_peers

    return hf_peers.bench_hf_steps(args)


def bench_sleep(args) -> list[Row]:
    """Tiny-model training step at N=2,4 vs N=1, per (window, pass) forward; peak memory N=4 / N=1."""
    import sleep_cost

    ns = argparse.Namespace(batch=args.sleep_batch, seq=args.sleep_T, window=args.sleep_window,
                            eval_passes=[1, 2, 4], repeats=args.repeats)
    cfg = f"tiny, B={ns.batch} T={ns.seq} L={ns.window}, ckpt on"
    rows = []
    for r in sleep_cost.time_steps(ns)[1:]:
        rows.append(Row(f"train step N={r['N']} vs N=1, per (window, pass) forward incl. recomputed", cfg,
                        f"{r['time_ratio']:.2f}x time / {r['forward_ratio']:.2f}x forwards ({r['forwards']} vs "
                        f"{round(r['forwards'] / r['forward_ratio'])})",
                        r["overhead"], goal=1.05, higher_is_better=False))
    rss = {n: sleep_cost.peak_step(ns, n, "pass") for n in (1, 4)}
    rows.append(Row("peak memory of a train step, N=4 / N=1", cfg + " (fresh process each, peak reset)",
                    f"{rss[4] / 2**20:.0f} MiB / {rss[1] / 2**20:.0f} MiB", rss[4] / max(rss[1], 1),
                    goal=1.5, higher_is_better=False))
    return rows


BENCHES: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "ssd": bench_ssd, "gdn": bench_gdn, "sleep": bench_sleep, "mixer": bench_mixer, "hf_step": bench_hf_steps}


def format_table(rows: list[Row]) -> str:
    lines = ["| benchmark | config | measured | ratio | goal | met |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        val = "n/a" if r.value != r.value else f"{r.value:.2f}{r.unit}"
        lines.append(f"| {r.name} | {r.config} | {r.measured} | {val} | {r.goal_str()} | {r.met} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="rows to run (default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: stable on shared CPUs)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--sleep-batch", type=int, default=8)
    ap.add_argument("--sleep-T", type=int, default=512)
    ap.add_argument("--sleep-window", type=int, default=64)
    ap.add_argument("--ssd-batch", type=int, default=2)
    ap.add_argument("--ssd-T", type=int, default=1024)
    ap.add_argument("--ssd-heads", type=int, default=8)
    ap.add_argument("--ssd-headdim", type=int, default=64)
    ap.add_argument("--ssd-dstate", type=int, default=64)
    ap.add_argument("--gdn-batch", type=int, default=1)
    ap.add_argument("--gdn-T", type=int, default=2048)
    ap.add_argument("--gdn-heads", type=int, default=4)
    ap.add_argument("--gdn-headdim", type=int, default=64)
    import hf_peers

    hf_peers.add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[Row] = []
    import hf_peers

    hf_peers.preload()
    for name in args.only or list(BENCHES):
        rows.extend(BENCHES[name](args))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads={torch.get_num_threads()}, repeats={args.repeats} (min of interleaved runs)\n")
    print(format_table(rows))
    return 0 if all(r.met != "NO" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
