"""Metrics: FLOP accounting over (window, pass) forwards, MFU, and the sinks (console progress bar,
JSONL, TensorBoard, W&B).

FLOPs of a training step = 3 x forward FLOPs (forward + backward; the recomputation done by
activation checkpointing is not counted, as usual for MFU). Forward FLOPs are counted per
(window, core pass) actually executed — so a step at N = 2 counts about twice the core FLOPs of a
step at N = 1 — plus prelude / coda once per window and the LM head on windows that carry targets.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# dense bf16 peak per device (TFLOP/s), by substring of torch.cuda.get_device_name()
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0,
                   "L4": 121.0, "A10": 125.0, "V100": 125.0, "4090": 165.0, "3090": 71.0}


class FlopCounter:
    """Forward FLOPs of the sleep forward for a batch, from the model's shapes."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.cfg = cfg
        # numel of ds-partitioned params is 0: use ds_shape when present
        def numel(p):
            shape = getattr(p, "ds_shape", None)
            return math.prod(shape) if shape is not None else p.numel()

        def lin(blocks):
            return sum(numel(m.weight) for b in blocks for m in b.modules() if isinstance(m, nn.Linear))

        self.core_lin = lin(model.core)
        self.other_lin = lin(model.prelude) + lin(model.coda)
        self.head = cfg.d_model * cfg.vocab_size
        self.core_attn = [model.layers[i] for i in model.core_idx if model.layers[i].kind == "attn"]
        self.core_ssm = [model.layers[i] for i in model.core_idx if model.layers[i].kind != "attn"]
        self.attn_width = cfg.attn.n_heads * cfg.attn_head_dim
        g, m = cfg.gdn, cfg.mamba2
        self.ssm_state = {"gdn": g.n_heads * g.head_dim * int(g.head_dim * g.expand_v),
                          "mamba2": (m.expand * cfg.d_model) * m.d_state}
        self.params = sum(numel(p) for p in {id(p): p for p in model.parameters()}.values())

    def core_per_token(self, kv_len: float) -> float:
        f = 2.0 * self.core_lin
        f += len(self.core_attn) * 4.0 * kv_len * self.attn_width
        f += sum(6.0 * self.ssm_state[b.kind] for b in self.core_ssm)
        return f

    def forward_flops(self, batch: int, seq_len: int, window: int, eviction: str, passes_used: list[int],
                      window_tokens: list[int]) -> float:
        total = 0.0
        for w, s in enumerate(range(0, seq_len, window)):
            n = min(window, seq_len - s)
            kv = (n + 1) / 2 + (min(window - 1, s) if eviction == "sliding" else 0)
            used = passes_used[w] if w < len(passes_used) else 1
            total += batch * n * (used * self.core_per_token(kv) + 2.0 * self.other_lin)
            if w < len(window_tokens) and window_tokens[w]:
                total += batch * n * 2.0 * self.head
        return total


def merge_window_sums(parts: list[dict[int, list[float]]]) -> dict[int, list[float]]:
    """{window: [loss sum, target tokens]} of several steps or ranks, added up."""
    merged: dict[int, list[float]] = {}
    for part in parts:
        for w, (loss_sum, tokens) in part.items():
            m = merged.setdefault(w, [0.0, 0.0])
            m[0] += loss_sum
            m[1] += tokens
    return merged


def step_metrics(rec: dict[str, Any], windows: dict[int, list[float]], *, world: int, peak_flops: float,
                 peak_mem_gb: float, tokens_seen: int, skipped: int) -> dict[str, Any]:
    """The logged record of a training step (``rec`` from Trainer.train_step, per-window sums merged
    over the steps since the last log and over ranks)."""
    dt = rec["step_seconds"]
    out = {"loss": rec["loss"], "grad_norm": rec["grad_norm"], "lr": rec["lr"], "passes": rec["passes"],
           "tokens_per_s": rec["input_tokens"] / dt, "target_tokens_per_s": rec["target_tokens"] / dt,
           "mfu": rec["flops"] / (dt * world * peak_flops), "sleep_share": rec["sleep_share"],
           "data_share": rec["data_share"], "peak_mem_gb": peak_mem_gb, "step_seconds": dt,
           "tokens_seen": tokens_seen, "skipped_steps": skipped,
           "window_loss": {str(w): windows[w][0] / windows[w][1] for w in sorted(windows)}}
    if len(rec["lrs"]) > 1:
        out["lr_groups"] = rec["lrs"]
    return out


def peak_flops(device: torch.device, configured_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if configured_tflops:
        return configured_tflops * 1e12, "logging.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12, f"table ({name}, bf16 dense)"
        return 312e12, f"default ({name} unknown: A100 bf16)"
    return measured_cpu_gemm_flops(), "measured fp32 GEMM on this CPU"


def measured_cpu_gemm_flops(n: int = 256, seconds: float = 0.3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t0)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB (process peak RSS)
    return kb / 2**20


def _console():
    """The ``megasleep.train`` logger, with the console handler of :mod:`megasleep.console` installed if the
    process has none yet (``deepspeed --module megasleep.train.cli`` does not go through ``megasleep.cli``)."""
    import logging

    root = logging.getLogger("megasleep")
    if not any(getattr(h, "_megasleep_console", False) for h in root.handlers):
        from megasleep.console import setup_console_logging

        setup_console_logging()
    return logging.getLogger("megasleep.train")


class MetricLogger:
    """Rank 0 writes; other ranks hold a no-op logger."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, total_steps: int, start_step: int,
                 experiment: dict | None = None):
        self.enabled = enabled
        self.jsonl = self.tb = self.wandb = self.bar = None
        # for the step / total and ETA of log lines where no progress bar is drawn (SLURM logs)
        self.total_steps, self.start_step, self.t_start = total_steps, start_step, time.time()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard is a soft dependency of the logger
                print(f"[megasleep] tensorboard disabled: {exc}", file=sys.stderr)
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            self.wandb = _init_wandb(cfg.wandb, run_dir, experiment)
        if cfg.progress:
            from tqdm import tqdm

            tty = sys.stderr.isatty() or bool(os.environ.get("MEGASLEEP_PROGRESS"))
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr, disable=not tty)

    def log(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": round(time.time(), 3), **metrics}
        if self.jsonl:
            self.jsonl.write(json.dumps(rec, default=_jsonable) + "\n")
        flat = _flatten(metrics, prefix=f"{kind}/")
        if self.tb:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(flat, step=step)
        if kind == "train":
            line = (f"loss {metrics.get('loss', float('nan')):.4f} lr {metrics.get('lr', 0):.2e} "
                    f"gnorm {metrics.get('grad_norm', float('nan')):.3g} "
                    f"{metrics.get('tokens_per_s', 0):,.0f} tok/s mfu {100 * metrics.get('mfu', 0):.2f}% "
                    f"sleep {100 * metrics.get('sleep_share', 0):.0f}% data {100 * metrics.get('data_share', 0):.0f}% "
                    f"mem {metrics.get('peak_mem_gb', 0):.2f}GB")
            if self.bar is not None and not self.bar.disable:
                self.bar.set_postfix_str(line, refresh=False)
            else:
                self.write(f"[step {step}/{self.total_steps}{self.eta(step)}] {line}")
        elif kind == "skipped":
            self.write(f"[step {step}] non-finite loss/gradient: step skipped "
                       f"(loss {metrics.get('loss')}, grad norm {metrics.get('grad_norm')}, "
                       f"{metrics.get('bad_in_row')} in a row)")

    def eta(self, step: int) -> str:
        """`` eta 1h02m`` from the mean step time since this process started ('' before the first step)."""
        done = step - self.start_step
        if done <= 0 or step >= self.total_steps:
            return ""
        left = (time.time() - self.t_start) / done * (self.total_steps - step)
        h, m = divmod(int(left) // 60, 60)
        return f" eta {h}h{m:02d}m" if h else f" eta {m}m{int(left) % 60:02d}s"

    def advance(self, n: int = 1) -> None:
        if self.bar is not None and not self.bar.disable:
            self.bar.update(n)

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=sys.stderr)
        else:
            # through the `megasleep` logger: a UTC timestamp on every line where stderr is not a terminal
            _console().info(text)

    def close(self) -> None:
        if not self.enabled:
            return
        for sink in (self.bar, self.jsonl, self.tb):
            if sink is not None:
                sink.close()
        if self.wandb:
            self.wandb.finish()


def _init_wandb(cfg, run_dir: Path, experiment: dict | None):
    try:
        import wandb
    except ImportError:
        print("[megasleep] logging.wandb.enabled but wandb is not installed (pip install -e .[wandb]); "
              "continuing without it", file=sys.stderr)
        return None
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=cfg.tags, dir=str(run_dir),
                      config=experiment, name=run_dir.name, resume="allow",
                      id=_wandb_id(run_dir))


def _wandb_id(run_dir: Path) -> str:
    """The same W&B run id across requeues of one run directory."""
    p = run_dir / "wandb_id.txt"
    if p.exists():
        return p.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    p.write_text(rid)
    return rid


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                if isinstance(x, (int, float)) and not isinstance(x, bool):
                    out[f"{prefix}{k}/{i}"] = float(x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
