"""Does sleep cost its passes and nothing more? (issue 2 acceptance; rows of benchmarks/ops_cpu.py)

For the tiny model, one training step (sleep forward + backward) at N = 1, 2, 4 is timed side by side
in one run. ``overhead(N) = (time(N) / time(1)) / (forwards(N) / forwards(1))`` where ``forwards`` is the
number of (window, core pass) forwards actually executed (goal <= 1.05: the loop adds nothing beyond the
passes themselves). Memory: bytes of activations saved for backward (exact, via saved-tensor hooks) and
the step's peak RSS above the pre-step RSS, measured in a fresh subprocess per N (goal N=4 / N=1 <= 1.5
with activation checkpointing on).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup(args, passes: int, checkpoint: bool = True):
    import torch

    from megasleep.models import HybridLM, load_model_config
    from megasleep.sleep import SleepConfig

    torch.manual_seed(0)
    cfg = load_model_config(ROOT / "configs/models/tiny.yaml", ["kernels=torch"])
    model = HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    scfg = SleepConfig(window=args.window, passes=passes, checkpoint=checkpoint)
    return model, ids, scfg


def train_step(model, ids, scfg):
    from megasleep.sleep import sleep_forward

    out = sleep_forward(model, ids, scfg)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out


def time_steps(args) -> list[dict]:
    import torch

    rows = []
    setups = {n: _setup(args, n) for n in args.passes}
    for n in args.passes:  # warm-up
        train_step(*setups[n])
    times = {n: [] for n in args.passes}
    forwards = {}
    for _ in range(args.repeats):  # interleave so drift hits every N alike
        for n in args.passes:
            t0 = time.perf_counter()
            out = train_step(*setups[n])
            times[n].append(time.perf_counter() - t0)
            forwards[n] = out.forwards
    base = args.passes[0]
    t_base = sorted(times[base])[len(times[base]) // 2]
    for n in args.passes:
        t = sorted(times[n])[len(times[n]) // 2]
        rel_t, rel_f = t / t_base, forwards[n] / forwards[base]
        rows.append({"N": n, "step_s": t, "forwards": forwards[n], "time_ratio": rel_t,
                     "forward_ratio": rel_f, "overhead": rel_t / rel_f})
    del torch
    return rows


def saved_bytes(args, passes: int, checkpoint: bool) -> int:
    import torch

    model, ids, scfg = _setup(args, passes, checkpoint)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, ids, scfg)
    return total


def _child_peak(args, passes: int) -> None:
    """Run in a fresh process: print peak RSS growth (bytes) of one training step."""
    model, ids, scfg = _setup(args, passes)
    train_step(model, ids, scfg)  # allocator warm-up at N=1 shapes would bias; use the same N
    with open("/proc/self/statm") as f:
        rss_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train_step(model, ids, scfg)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_growth": max(peak_after, peak_before) - rss_before}))


def peak_rss(args, passes: int) -> int:
    cmd = [sys.executable, __file__, "--child-peak", str(passes), "--batch", str(args.batch),
           "--seq", str(args.seq), "--window", str(args.window)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--passes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=5)


def report(args) -> str:
    rows = time_steps(args)
    lines = [f"### Sleep cost, tiny model, batch {args.batch}, T={args.seq}, L={args.window} (fwd+bwd, checkpointing on)",
             "", "| N | step (s) | (window, pass) forwards | time / time(N=1) | forwards / forwards(N=1) "
             "| overhead (goal <= 1.05) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['step_s']:.3f} | {r['forwards']} | {r['time_ratio']:.2f} "
                     f"| {r['forward_ratio']:.2f} | {r['overhead']:.3f} |")
    n_hi = args.passes[-1]
    saved = {(n, c): saved_bytes(args, n, c) for n in (1, n_hi) for c in (True, False)}
    rss = {n: peak_rss(args, n) for n in (1, n_hi)}
    lines += ["", f"| memory of one training step | N=1 | N={n_hi} | ratio (goal <= 1.5 with checkpointing) |",
              "| --- | --- | --- | --- |"]
    for ckpt in (True, False):
        a, b = saved[(1, ckpt)], saved[(n_hi, ckpt)]
        lines.append(f"| activations saved for backward, checkpointing {'on' if ckpt else 'off'} "
                     f"| {a / 2**20:.1f} MiB | {b / 2**20:.1f} MiB | {b / a:.2f} |")
    lines.append(f"| peak RSS growth during the step (fresh process, checkpointing on) "
                 f"| {rss[1] / 2**20:.1f} MiB | {rss[n_hi] / 2**20:.1f} MiB | {rss[n_hi] / max(rss[1], 1):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--child-peak", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child_peak is not None:
        _child_peak(args, args.child_peak)
        return 0
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
