"""GPU check: kernel-vs-torch speed, training throughput / MFU, and wake latency, as one markdown table.

Run through ``benchmarks/gpu_check.sh`` (which first runs the CUDA parity tests). Everything here is
measured in this run; nothing is installed over the network. On a machine without CUDA it exits with
a clear message (the table writer and the argument parsing are unit-tested on CPU).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_HEADER = ["model", "N", "batch x T", "tokens/s", "model TFLOP/s", "MFU", "peak GiB",
                "tokens/s / tokens/s(N=1)", ">= 1/N"]
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM parts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--models", nargs="+", default=["350m", "1.3b"], help="configs/models/<name>.yaml")
    p.add_argument("--eval-passes", type=int, nargs="+", default=[1, 2, 4], help="the N to measure at")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed training steps per (model, N)")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke test of the script)")
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "train", "wake"])
    p.add_argument("--device", default="cuda", help="cpu runs the training rows only (a smoke test)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "bf16-autocast"],
                   help="training rows: bf16 weights (A_log/dt_bias/D fp32, the GPU configs' train.precision) "
                        "or autocast over fp32 weights")
    args = p.parse_args(argv)
    if any(n < 1 for n in args.eval_passes):
        p.error("--eval-passes must all be >= 1")
    if args.seq < 1 or args.window < 1 or args.batch < 1 or args.steps < 1:
        p.error("--seq, --window, --batch and --steps must be >= 1")
    return args


def git_commit() -> str:
    """The checked-out commit (and whether the tree has local changes), for the report header."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (with local changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Render rows as a GitHub markdown table; floats get 3 significant decimals."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)
    if any(len(r) != len(header) for r in rows):
        raise ValueError("every row needs one cell per column")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------------------------------ kernels
def kernel_rows(quick: bool) -> list[list[object]]:
    import torch

    from megasleep.ops.gated_delta import gated_delta_rule
    from megasleep.ops.ssd import ssd

    dev = "cuda"
    T = 1024 if quick else 4096
    rows = []
    torch.manual_seed(0)
    B, H, P, N = 2, 32, 64, 128
    x = torch.randn(B, T, H, P, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, device=dev) - 3).requires_grad_()
    A = -torch.rand(H, device=dev).add(0.5).requires_grad_()
    Bm = torch.randn(B, T, 1, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    Cm = torch.randn(B, T, 1, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    h0 = torch.randn(B, H, P, N, device=dev, requires_grad=True)

    def ssd_step(backend):
        y, s = ssd(x, dt, A, Bm, Cm, None, h0, backend=backend, chunk_size=256 if backend == "cuda" else 64)
        (y.float().sum() + s.sum()).backward()

    Hg, K, V = 16, 128, 128
    q = torch.nn.functional.normalize(torch.randn(B, T, Hg, K, device=dev), dim=-1).bfloat16().requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, Hg, K, device=dev), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(B, T, Hg, V, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, Hg, device=dev) + 3).requires_grad_()
    beta = torch.rand(B, T, Hg, device=dev).requires_grad_()
    s0 = torch.randn(B, Hg, K, V, device=dev, requires_grad=True)

    def gdn_step(backend):
        o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, backend=backend)
        (o.float().sum() + s.sum()).backward()

    for name, fn, shape in (("SSD (mamba2 scan)", ssd_step, f"B={B} T={T} H={H} P={P} N={N}"),
                            ("gated delta rule", gdn_step, f"B={B} T={T} H={Hg} K={K} V={V}")):
        t_torch = cuda_time(lambda fn=fn: fn("torch"))
        try:
            t_cuda = cuda_time(lambda fn=fn: fn("cuda"))
            rows.append([name + " fwd+bwd, h0 grad", shape, t_torch * 1e3, t_cuda * 1e3, t_torch / t_cuda])
        except Exception as exc:  # report, do not hide
            rows.append([name + " fwd+bwd", shape, t_torch * 1e3, f"unavailable: {exc}"[:80], "-"])
    return rows


# ------------------------------------------------------------------------------------------ training
def train_rows(args) -> list[list[object]]:
    import torch

    from megasleep.models import HybridLM, load_model_config
    from megasleep.sleep import SleepConfig, sleep_forward

    rows = []
    dev = args.device
    on_cuda = dev.startswith("cuda")
    peak = peak_tflops(torch.cuda.get_device_name()) if on_cuda else None
    for model_name in args.models:
        cfg = load_model_config(ROOT / "configs/models" / f"{model_name}.yaml", ["kernels=auto"])
        torch.manual_seed(0)
        with torch.device(dev):
            model = HybridLM(cfg)
        if args.precision == "bf16":  # as the trainer does under ZeRO-1/2 (its fp32 master copies are not timed)
            from megasleep.models.precision import cast_parameters

            cast_parameters(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda)
        p_core = sum(p.numel() for i in model.core_idx for p in model.layers[i].parameters())
        p_rest = model.num_parameters() - p_core - model.embed_tokens.weight.numel() * (0 if cfg.tie_embeddings else 1)
        n_attn = sum(1 for b in model.layers if b.kind == "attn")
        d_attn = cfg.attn.n_heads * cfg.attn_head_dim
        T, L, B = args.seq, args.window, args.batch
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
        base = None
        for n in args.eval_passes:
            scfg = SleepConfig(window=L, passes=n)
            state = {}

            def step(model=model, ids=ids, scfg=scfg, opt=opt, state=state):
                with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16):
                    out = sleep_forward(model, ids, scfg)
                out.loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                state["forwards"] = out.forwards

            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            t = cuda_time(step, repeats=args.steps, warmup=1)
            windows = -(-T // L)
            tokens = B * T
            # model FLOPs (no recomputation): 6 * params * tokens, core counted once per (window, pass);
            # attention scores/values: 12 * layers * d_attn * L/2 per token and pass (causal, window L)
            passes_per_window = state["forwards"] / windows
            flops = 6 * tokens * (p_rest + p_core * passes_per_window)
            flops += 12 * n_attn * d_attn * (L / 2) * tokens * passes_per_window
            tflops = flops / t / 1e12
            mem = torch.cuda.max_memory_allocated() / 2**30 if on_cuda else float("nan")
            tps = tokens / t
            base = base if n != args.eval_passes[0] else tps
            # goal: throughput at N >= 1/N of N=1's (sleep costs its passes and nothing more)
            rows.append([model_name, n, f"{B}x{T}, L={L}", tps, tflops,
                         f"{100 * tflops / peak:.1f}%" if peak else "-", mem, tps / base,
                         "yes" if tps / base >= 1 / n * 0.999 else "NO"])
        del model, opt
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------ wake latency
def wake_rows(quick: bool) -> list[list[object]]:
    """Per-token wake latency at 512 vs 16k tokens of context through the streaming engine, if present."""
    try:
        from megasleep.inference import InferenceSession  # noqa: F401
    except Exception as exc:
        return [["streaming engine not available", f"{type(exc).__name__}: {exc}"[:100], "-", "-"]]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import wake_latency
    except Exception as exc:
        return [["benchmarks/wake_latency.py not importable", str(exc)[:100], "-", "-"]]
    fn = getattr(wake_latency, "measure_gpu_rows", None)
    if fn is None:
        return [["wake_latency.measure_gpu_rows missing", "-", "-", "-"]]
    return fn(quick=quick)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    if args.device == "cpu":
        print(markdown_table(TRAIN_HEADER, train_rows(args)))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; nothing to measure.", file=sys.stderr)
        return 2
    if args.quick:
        args.seq, args.window, args.steps, args.models = 1024, 256, 2, args.models[:1]
    from megasleep.ops._peers import kernel_report

    name = torch.cuda.get_device_name()
    parts = [f"# GPU check — {_dt.date.today().isoformat()}", "", f"- commit: {git_commit()}",
             f"- device: {name}; torch {torch.__version__}; CUDA {torch.version.cuda}; "
             f"python {platform.python_version()}", "- kernels: " + "; ".join(
                 f"{k}: {v}" for k, v in kernel_report().items()), ""]
    sections = [("kernels", "## Kernel vs torch (chunked) speed", kernel_rows, (args.quick,),
                 ["op", "shape", "torch ms", "cuda ms", "speed-up"]),
                ("train", f"## Training throughput ({args.precision}, AdamW, single GPU = ZeRO-0, "
                          "activation checkpointing per (window, pass))", train_rows, (args,),
                 TRAIN_HEADER),
                ("wake", "## Wake latency (streaming engine)", wake_rows, (args.quick,),
                 ["model", "context", "ms / token", "ratio vs 512"])]
    for key, title, fn, fargs, header in sections:
        if key in args.skip:
            continue
        t0 = time.perf_counter()
        try:
            table = markdown_table(header, fn(*fargs))
        except Exception as exc:
            table = f"failed: {type(exc).__name__}: {exc}"
        parts += [title, "", table, "", f"({time.perf_counter() - t0:.0f} s)", ""]
        print("\n".join(parts[-6:]), flush=True)
    report = "\n".join(parts)
    if args.out:
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
