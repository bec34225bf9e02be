"""Does sleep cost its passes and nothing more? (rows of benchmarks/ops_cpu.py)

For the tiny model, one training step (sleep forward + backward) at N = 1, 2, 4 is timed side by side
in one run. ``overhead(N) = (time(N) / time(1)) / (forwards(N) / forwards(1))`` where ``forwards`` is the
number of (window, core pass) forwards actually executed, recomputations included (the default
checkpointing recomputes every pass in backward but the step's last; goal <= 1.05: the loop adds
nothing beyond the passes themselves). Memory: bytes of activations saved for backward (exact, via saved-tensor hooks) and
the step's peak memory above the pre-step level with the peak mark reset just before the step
(benchmarks/peak_memory.py), in a fresh subprocess per (N, checkpointing policy) after one warm-up
step (goal N=4 / N=1 <= 1.5 with the default policy). The policy table is what the default
activation-checkpointing policy was chosen from (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import peak_bytes  # noqa: E402

# activation-checkpointing policies: SleepConfig fields
POLICIES = {"none": dict(checkpoint=False), "pass": dict(checkpoint=True, checkpoint_blocks=None),
            "blocks:1": dict(checkpoint=True, checkpoint_blocks=1),
            "blocks:2": dict(checkpoint=True, checkpoint_blocks=2)}


def _setup(args, passes: int, policy: str = "pass"):
    import torch

    from megasleep.models import HybridLM, load_model_config
    from megasleep.sleep import SleepConfig

    torch.manual_seed(0)
    cfg = load_model_config(ROOT / "configs/models/tiny.yaml", ["kernels=torch"])
    model = HybridLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    scfg = SleepConfig(window=args.window, passes=passes, **POLICIES[policy])
    return model, ids, scfg


def train_step(model, ids, scfg):
    from megasleep.sleep import sleep_forward

    out = sleep_forward(model, ids, scfg)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return out


def time_steps(args, policy: str = "pass") -> list[dict]:
    import torch

    rows = []
    setups = {n: _setup(args, n, policy) for n in args.eval_passes}
    for n in args.eval_passes:  # warm-up
        train_step(*setups[n])
    times = {n: [] for n in args.eval_passes}
    forwards = {}
    for _ in range(args.repeats):  # interleave so drift hits every N alike
        for n in args.eval_passes:
            t0 = time.perf_counter()
            out = train_step(*setups[n])
            times[n].append(time.perf_counter() - t0)
            # + the recomputations in backward: every (window, pass) but the step's last under 'pass'
            forwards[n] = 2 * out.forwards - 1 if policy == "pass" else out.forwards
    base = args.eval_passes[0]
    t_base = sorted(times[base])[len(times[base]) // 2]
    for n in args.eval_passes:
        t = sorted(times[n])[len(times[n]) // 2]
        rel_t, rel_f = t / t_base, forwards[n] / forwards[base]
        rows.append({"N": n, "step_s": t, "forwards": forwards[n], "time_ratio": rel_t,
                     "forward_ratio": rel_f, "overhead": rel_t / rel_f})
    del torch
    return rows


def time_policies(args, passes: int) -> dict[str, float]:
    """Median step time per checkpointing policy at N = ``passes``, interleaved in one run."""
    setups = {p: _setup(args, passes, p) for p in POLICIES}
    for p in POLICIES:  # warm-up
        train_step(*setups[p])
    times = {p: [] for p in POLICIES}
    for _ in range(args.repeats):
        for p in POLICIES:
            t0 = time.perf_counter()
            train_step(*setups[p])
            times[p].append(time.perf_counter() - t0)
    return {p: sorted(t)[len(t) // 2] for p, t in times.items()}


def saved_bytes(args, passes: int, policy: str) -> int:
    import torch

    model, ids, scfg = _setup(args, passes, policy)
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(model, ids, scfg)
    return total


def _child_peak(args, passes: int, policy: str) -> None:
    """Run in a fresh process: print the peak memory growth (bytes) of one training step."""
    model, ids, scfg = _setup(args, passes, policy)
    train_step(model, ids, scfg)  # warm-up: lazy imports, RoPE tables, allocator pools
    print(json.dumps({"peak_growth": peak_bytes(lambda: train_step(model, ids, scfg))}))


# glibc keeps freed heap memory mapped, so on CPU the peak RSS also counts heap fragmentation, which
# grows with the number of interleaved allocations (more passes) although live tensors do not.
# With blocks of 64 KiB and more mmapped (unmapped again when freed) RSS follows live memory,
# closer to what CUDA's max_memory_allocated reports. Both are measured, side by side.
MMAP_LARGE = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak_step(args, passes: int, policy: str, malloc_env: dict | None = None) -> int:
    import os

    cmd = [sys.executable, __file__, "--child-peak", str(passes), "--policy", policy, "--batch", str(args.batch),
           "--seq", str(args.seq), "--window", str(args.window)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, **(malloc_env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_growth"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--eval-passes", type=int, nargs="+", default=[1, 2, 4], help="the N to measure at")
    p.add_argument("--repeats", type=int, default=5)


def report(args) -> str:
    rows = time_steps(args)
    lines = [f"### Sleep cost, tiny model, batch {args.batch}, T={args.seq}, L={args.window} "
             "(fwd+bwd, SleepConfig's default checkpointing)",
             "", "| N | step (s) | (window, pass) forwards incl. recomputed | time / time(N=1) | forwards / forwards(N=1) "
             "| overhead (goal <= 1.05) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['N']} | {r['step_s']:.3f} | {r['forwards']} | {r['time_ratio']:.2f} "
                     f"| {r['forward_ratio']:.2f} | {r['overhead']:.3f} |")
    n_hi = args.eval_passes[-1]
    lines += ["", f"| checkpointing policy | step time N={n_hi} / policy 'pass' | activations saved, N=1 "
              f"| N={n_hi} | peak step memory N=1 / N={n_hi}, glibc defaults | ratio | peak N=1 / N={n_hi}, "
              "blocks >= 64 KiB mmapped | ratio (goal <= 1.5) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    times = time_policies(args, n_hi)
    for policy in POLICIES:
        saved = [saved_bytes(args, n, policy) for n in (1, n_hi)]
        peak = [peak_step(args, n, policy) for n in (1, n_hi)]
        live = [peak_step(args, n, policy, MMAP_LARGE) for n in (1, n_hi)]
        lines.append(f"| {policy} | {times[policy] / times['pass']:.2f} | {saved[0] / 2**20:.1f} MiB "
                     f"| {saved[1] / 2**20:.1f} MiB | {peak[0] / 2**20:.1f} / {peak[1] / 2**20:.1f} MiB "
                     f"| {peak[1] / max(peak[0], 1):.2f} | {live[0] / 2**20:.1f} / {live[1] / 2**20:.1f} MiB "
                     f"| {live[1] / max(live[0], 1):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--child-peak", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--policy", default="pass", choices=list(POLICIES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child_peak is not None:
        _child_peak(args, args.child_peak, args.policy)
        return 0
    print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
