"""Per-token wake latency and memory vs context length: megasleep's streaming session against the same
model run as a plain decoder whose attention KV is never evicted.

    python benchmarks/wake_latency.py                                  # tiny and 350m, 512..16k, CPU
    python benchmarks/wake_latency.py --models tiny --contexts 512,2048 --steps 16   # quick look

For each (model, mode) a fresh subprocess (so that its peak RSS is its own):
* builds the model from ``configs/models/<name>.yaml`` with random weights (fp32 by default; latency and
  memory do not depend on the weight values);
* ``megasleep`` mode: ``Session(window=L, passes=N, eviction=E)``; ``decoder`` mode: the same model with
  one window longer than the whole run and N = 1, i.e. every attention layer keeps every key (SSM layers
  run as usual);
* phase 1 — for each context length C (ascending, one growing sequence): prefills random tokens up to C
  (chunked, sleeping at every window boundary in megasleep mode), runs ``--warmup`` untimed steps,
  saves the session's state to a temporary file, then times ``--steps`` single-token ``Session.step``
  calls (wake decode: recurrent SSM step, KV append; the next token is the argmax) and records
  - the bytes of every tensor the session holds (``Session.state_bytes``: caches, window buffers;
    weights excluded),
  - the wake peak RSS: the process's peak RSS during those timed steps (Linux: glibc's free memory is
    handed back with malloc_trim(0) and the kernel's peak mark reset through /proc/self/clear_refs
    just before them, VmHWM read after) — weights, state, and the temporaries of a wake step,
  - the process peak RSS since start (max of VmHWM over the run; it also counts prefill and sleep
    temporaries, and the first window's are smaller: its attention has no previous keys),
  - the mean time of one sleep (passes 2..N over a window + eviction);
* phase 2 — loads the saved sessions (one per context) and steps them round-robin, ``--steps`` each:
  the reported wake latency is the median of these, so that load from other processes on a shared
  machine hits every context alike (phase 1's sequential median is reported too). A step that fills
  a window (and so sleeps) is excluded from the wake latency (with the defaults it cannot happen:
  contexts are multiples of L and warmup + 2 * steps < L).

Prefill runs with ``--threads`` torch threads, every timed or warm-up step with ``--step-threads``
(default 1: on a 2-core machine shared with other work, a 2-thread step stalls whenever another
process holds one core, which made step times swing 10x in our first runs).

Prints a table and the ratios latency(16k)/latency(512) and memory(16k)/memory(512) per (model, mode);
``--json`` / ``--markdown`` write them to files.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import malloc_trim, reset_peak, rss_now, rss_peak, vm_hwm  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,350m", help="names under configs/models/, comma separated")
    p.add_argument("--modes", default="megasleep,decoder")
    p.add_argument("--contexts", default="512,2048,8192,16384")
    p.add_argument("--window", type=int, default=512, help="L for megasleep mode")
    p.add_argument("--passes", type=int, default=2, help="N for megasleep mode")
    p.add_argument("--eviction", default="sliding", choices=["hard", "sliding"],
                   help="sliding (default) keeps L-1 keys at every step: the worst case for wake latency")
    p.add_argument("--steps", default="tiny=64,350m=24", help="timed steps per context: N or name=N,...")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prefill-chunk", type=int, default=512, help="tokens per prefill call (both modes)")
    p.add_argument("--threads", default="1", help="torch threads for building and prefill: N or name=N,...")
    p.add_argument("--step-threads", type=int, default=1,
                   help="torch threads for the timed wake steps (1: robust on a machine shared with other work)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all measurements here")
    p.add_argument("--markdown", default=None, help="write the table + ratios here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def per_model(spec: str, model: str) -> int:
    if "=" not in spec:
        return int(spec)
    table = dict(kv.split("=") for kv in spec.split(","))
    return int(table.get(model, table.get("default", 16)))


def child(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from megasleep.inference import Session
    from megasleep.models.config import load_model_config
    from megasleep.models.hybrid import build_model

    torch.set_num_threads(int(args.threads))
    torch.manual_seed(args.seed)
    contexts = [int(c) for c in args.contexts.split(",")]
    steps = per_model(args.steps, args.model)
    cfg = load_model_config(ROOT / "configs" / "models" / f"{args.model}.yaml")
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    model = build_model(cfg, dev).to(getattr(torch, args.dtype)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    build_s = time.perf_counter() - t0
    total = max(contexts) + 2 * len(contexts) * (steps + args.warmup) + 1

    def make_session():
        if args.mode == "megasleep":
            return Session(model, window=args.window, passes=args.passes, eviction=args.eviction,
                           prefill_chunk=args.prefill_chunk)
        return Session(model, window=total + 1, passes=1, prefill_chunk=args.prefill_chunk)

    sess = make_session()
    gen = torch.Generator().manual_seed(args.seed)
    V = cfg.vocab_size
    emit({"event": "start", "model": args.model, "mode": args.mode, "params": model.num_parameters(),
          "threads": torch.get_num_threads(), "step_threads": args.step_threads,
          "build_s": build_s, "steps": steps, "rss": rss_now()})

    def timed_step(sess, tok):
        torch.set_num_threads(args.step_threads)
        before = sess.sleeps
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tok = sess.step(tok).argmax(-1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return tok, time.perf_counter() - t0, sess.sleeps != before

    # phase 1: one growing sequence; memory and (sequential) latency at each context; state saved to disk
    snapdir = Path(tempfile.mkdtemp(prefix="wake_latency_"))
    recs = {}
    peak_so_far = 0
    try:
        for ctx in contexts:
            need = ctx - sess.position
            torch.set_num_threads(int(args.threads))
            t0 = time.perf_counter()
            if need > 0:
                sess.feed(torch.randint(0, V, (1, need), generator=gen).to(dev), logits="none")
            prefill_s = time.perf_counter() - t0
            tok = torch.randint(0, V, (1,), generator=gen).to(dev)
            torch.set_num_threads(args.step_threads)
            for _ in range(args.warmup):
                tok = sess.step(tok).argmax(-1)
            torch.save({"state": sess.state_dict(), "tok": tok}, snapdir / f"{ctx}.pt")
            gc.collect()
            peak_so_far = max(peak_so_far, vm_hwm() or rss_peak())
            malloc_trim()
            can_reset = reset_peak()
            seq, sleep_steps = [], 0
            for _ in range(steps):
                tok, dt, slept = timed_step(sess, tok)
                sleep_steps += slept
                if not slept:
                    seq.append(dt)
            wake_peak = vm_hwm() if can_reset else None
            peak_so_far = max(peak_so_far, vm_hwm() or rss_peak())
            kv = max((c.k.shape[2] for c in sess.caches if c.k is not None), default=0)
            sl = [r.seconds for r in sess.sleep_log if r.passes_used > 1]
            recs[ctx] = {"event": "context", "model": args.model, "mode": args.mode, "context": ctx,
                         "prefill_s": prefill_s, "seq_median_ms": 1e3 * statistics.median(seq),
                         "sleep_steps": sleep_steps, "kv_keys": kv, "state_bytes": sess.state_bytes(),
                         "rss": rss_now(), "peak_rss": peak_so_far, "wake_peak_rss": wake_peak,
                         "sleeps": sess.sleeps,
                         "sleep_ms": 1e3 * statistics.fmean(sl) if sl else None,
                         "cuda_max_alloc": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
                         "cuda_alloc": torch.cuda.memory_allocated() if dev.type == "cuda" else None}
            print(f"  {args.model} {args.mode} reached {ctx} (prefill {prefill_s:.1f} s)", file=sys.stderr, flush=True)
        # phase 2: the saved sessions, one per context, stepped round-robin so that load from other
        # processes on the machine hits every context alike; this gives the reported wake latency
        del sess
        sessions, toks = {}, {}
        for ctx in contexts:
            snap = torch.load(snapdir / f"{ctx}.pt")
            sessions[ctx] = make_session().load_state_dict(snap["state"])
            toks[ctx] = snap["tok"]
    finally:
        shutil.rmtree(snapdir, ignore_errors=True)
    times = {ctx: [] for ctx in contexts}
    for _ in range(steps):
        for ctx in contexts:
            toks[ctx], dt, slept = timed_step(sessions[ctx], toks[ctx])
            if not slept:
                times[ctx].append(dt)
    for ctx in contexts:
        t = sorted(times[ctx])
        emit({**recs[ctx], "median_ms": 1e3 * statistics.median(t), "p10_ms": 1e3 * t[int(0.1 * (len(t) - 1))],
              "p90_ms": 1e3 * t[int(0.9 * (len(t) - 1))], "timed_steps": len(t)})


def emit(obj) -> None:
    print("@@" + json.dumps(obj), flush=True)


def run_child(args, model: str, mode: str) -> list[dict]:
    threads = per_model(args.threads, model)
    cmd = [sys.executable, __file__, "--child", "--model", model, "--mode", mode, "--threads", str(threads)]
    for k in ("contexts", "window", "passes", "eviction", "steps", "warmup", "prefill_chunk", "dtype",
              "device", "seed", "step_threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env) as proc:
        for line in proc.stdout:
            if line.startswith("@@"):
                rec = json.loads(line[2:])
                out.append(rec)
                if rec["event"] == "context":
                    print(f"  {model:>6} {mode:>9} ctx={rec['context']:>6}: wake {rec['median_ms']:.2f} ms/token "
                          f"(sequential {rec['seq_median_ms']:.2f}), state {rec['state_bytes'] / 2**20:.2f} MiB, "
                          f"wake peak RSS {wake_mib(rec)} MiB", file=sys.stderr, flush=True)
    if proc.returncode:
        raise SystemExit(f"child {model}/{mode} failed with code {proc.returncode}")
    return out


def mib(x):
    return f"{x / 2**20:.2f}"


def wake_mib(r):
    return "-" if r.get("wake_peak_rss") is None else f"{r['wake_peak_rss'] / 2**20:.0f}"


def ratio(b, a):
    return "-" if a is None or b is None else f"{b / a:.3f}"


def report(args, records: list[dict]) -> str:
    ctxs = [int(c) for c in args.contexts.split(",")]
    rows = [r for r in records if r["event"] == "context"]
    starts = {(r["model"], r["mode"]): r for r in records if r["event"] == "start"}
    lines = ["| model | mode | context | wake ms/token (median) | p10 / p90 ms | sequential median ms | "
             "KV keys held | session state MiB | wake peak RSS MiB | process peak RSS MiB | sleep ms/window |",
             "|" + " --- |" * 11]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['context']} | {r['median_ms']:.2f} | "
                     f"{r['p10_ms']:.2f} / {r['p90_ms']:.2f} | {r['seq_median_ms']:.2f} | "
                     f"{r['kv_keys']} | {mib(r['state_bytes'])} | {wake_mib(r)} | "
                     f"{r['peak_rss'] / 2**20:.0f} | "
                     f"{'-' if r['sleep_ms'] is None else format(r['sleep_ms'], '.1f')} |")
    if any(r.get("cuda_max_alloc") for r in rows):
        lines += ["", "| model | mode | context | CUDA allocated MiB | CUDA max allocated MiB |", "|" + " --- |" * 5]
        lines += [f"| {r['model']} | {r['mode']} | {r['context']} | {mib(r['cuda_alloc'])} | {mib(r['cuda_max_alloc'])} |"
                  for r in rows]
    lo, hi = ctxs[0], ctxs[-1]
    lines += ["", f"| model | mode | params | threads (prefill / steps) | latency({hi})/latency({lo}) | state({hi})/state({lo}) | "
                  f"sequential latency({hi})/({lo}) | wake peak RSS({hi})/({lo}) | process peak RSS({hi})/({lo}) |",
              "|" + " --- |" * 9]
    for key, st in starts.items():
        by = {r["context"]: r for r in rows if (r["model"], r["mode"]) == key}
        if lo in by and hi in by:
            a, b = by[lo], by[hi]
            lines.append(f"| {key[0]} | {key[1]} | {st['params'] / 1e6:.1f}M | {st['threads']} / {st['step_threads']} | "
                         f"{b['median_ms'] / a['median_ms']:.3f} | "
                         f"{b['state_bytes'] / a['state_bytes']:.3f} | {b['seq_median_ms'] / a['seq_median_ms']:.3f} | "
                         f"{ratio(b.get('wake_peak_rss'), a.get('wake_peak_rss'))} | "
                         f"{b['peak_rss'] / a['peak_rss']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    header = (f"wake_latency: {date.today().isoformat()}, {platform.node()} {platform.machine()}, "
              f"{os.cpu_count()} CPUs ({platform.processor() or 'cpu'}), torch {torch.__version__}, "
              f"device {args.device}, prefill threads {args.threads}, step threads {args.step_threads}, {args.dtype}; megasleep L={args.window} "
              f"N={args.passes} eviction={args.eviction}; decoder = same model, no eviction, N=1; "
              f"steps {args.steps}, warmup {args.warmup}, prefill chunk {args.prefill_chunk}")
    print(header, file=sys.stderr)
    records = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            records += run_child(args, model, mode)
    table = report(args, records)
    cmd = "python benchmarks/wake_latency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(header + "\n" + cmd + "\n\n" + table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": header, "command": cmd, "records": records}, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(f"{header}\n\n`{cmd}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
