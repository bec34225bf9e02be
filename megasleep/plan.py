"""``megasleep plan``: will a config fit and how much will a step cost, before anyone queues for a week.

Per GPU, for the config's ZeRO stage (deepspeed.zero_stage or its JSON) on ``nodes x gpus_per_node``:

* model states -- parameters, gradients, optimizer state. ``--precision bf16`` (bf16 parameters with
  fp32 master weights, DeepSpeed's accounting) uses DeepSpeed's own formulas
  (``estimate_zero2_model_states_mem_needs``: ``2P + 18P/W``; ``estimate_zero3_model_states_mem_needs``:
  ``4 * largest layer + 18P/W``; stage 1: ``4P + 16P/W``; stage 0: ``20P``). ``--precision autocast``
  (fp32 weights, bf16 autocast) counts fp32 weights and gradients, the Adam moments, and the bf16
  copies autocast keeps of every weight during the forward; ``fp32`` the same without those copies.
  By default the precision is the config's ``train.precision`` (``auto`` = autocast on a GPU). Under
  ZeRO-3 with ``deepspeed.zero3_keep_gathered`` (the default) every weight stays gathered for the
  micro-batch: a full copy of the weights per GPU is added ("kept gathered weights").
* activations -- what autograd keeps for backward at the config's micro-batch, window L, N and
  checkpointing policy. Each block is run once on the meta device (no memory, no compute) under a
  saved-tensor hook to count the bytes it saves at ``[micro_batch, L]`` (SSM scans counted as the
  fused CUDA kernels save them unless ``--kernels torch``); the sleep loop's structure then says how
  many copies live at once (see :func:`activation_bytes`).
* the batch / world checks and the FLOPs of one optimizer step (model FLOPs, as used for MFU, and
  with the recomputation activation checkpointing adds).

Not counted: the CUDA context and library workspaces (``--overhead-gib``, default 2), allocator
fragmentation, communication buckets. The verdict compares the sum with ``--gpu-mem``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

GIB = 2**30


@dataclass
class BlockCost:
    saved: int          # bytes autograd saves for backward in one forward of the block at [b, L]
    params: int         # parameters of the block (for FLOPs)
    state: int          # bytes of its fast-weight state (carried between passes)


_PACK = []  # the active counting hook (so fused-kernel stand-ins can count what a kernel saves)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs (views count their base once;
    parameters are model state, not activations)."""
    seen: dict[int, int] = {}
    keep = []

    def pack(t):
        base = t if t._base is None else t._base
        if not isinstance(base, torch.nn.Parameter):
            keep.append(base)
            seen[id(base)] = base.numel() * base.element_size()
        return t

    _PACK.append(pack)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        _PACK.pop()
    return sum(seen.values())


@contextlib.contextmanager
def fused_scan_accounting():
    """Count the SSM scans as the CUDA kernels save them (their inputs and output, nothing inside),
    not as the chunked torch path does (its [chunk x chunk] intermediates are far larger)."""
    import megasleep.models.gdn as gdn
    import megasleep.models.mamba2 as mamba2

    def fused(op):
        def run(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # inner: uncounted
                out = op(*args, **kwargs)
            for t in [*args, *kwargs.values(), out[0]]:
                if isinstance(t, torch.Tensor) and _PACK:
                    _PACK[-1](t)
            return out
        return run

    saved = mamba2.ssd, gdn.gated_delta_rule
    mamba2.ssd, gdn.gated_delta_rule = fused(mamba2.ssd), fused(gdn.gated_delta_rule)
    try:
        yield
    finally:
        mamba2.ssd, gdn.gated_delta_rule = saved


def block_costs(model, batch: int, window: int, dtype: torch.dtype, device="meta") -> list[BlockCost]:
    from megasleep.models.cache import MixContext

    ctx = MixContext.for_span(0, window, window, backend="torch", device=device)
    costs = []
    for blk in model.layers:
        h = torch.empty(batch, window, model.config.d_model, device=device, dtype=dtype, requires_grad=True)
        cache = blk.init_cache(batch, device, dtype)
        state = cache.ssm.numel() * cache.ssm.element_size() if cache.ssm is not None else 0
        costs.append(BlockCost(_saved_bytes(lambda b=blk, c=cache, x=h: b(x, c, ctx)),
                               sum(p.numel() for p in blk.parameters()), state))
    return costs


def head_saved(model, batch: int, window: int, dtype: torch.dtype, device="meta",
               grad_in_forward: bool = False) -> int:
    """Bytes the fused head + CE of one window keeps for backward (``HybridLM.head_loss``: its input
    and per-row log-sum-exp, or, with ``grad_in_forward``, the gradients it computed)."""
    h = torch.empty(batch, window, model.config.d_model, device=device, dtype=dtype, requires_grad=True)
    tgt = torch.zeros(batch, window, dtype=torch.long, device=device)
    mask = torch.ones(batch, window, dtype=torch.bool, device=device)
    return _saved_bytes(lambda: model.head_loss(h, tgt, mask, grad_in_forward=grad_in_forward))


def activation_parts(model, sleep, batch: int, seq: int, dtype: torch.dtype, device="meta") -> tuple[int, int]:
    """(bytes kept for backward by one micro-batch of ``seq`` tokens, extra bytes at the peak of
    backward while the largest checkpointed region is recomputed). The sleep loop's structure:

    * every window keeps its prelude activations (the prelude is not checkpointed);
    * ``(windows - 1) * N + 1`` core passes run (the last window does not sleep); per pass, policy
      ``none`` keeps every core block's activations, ``pass`` keeps the pass input and the states,
      ``blocks:k`` keeps the input of every k-th block and the activations of the others;
    * when checkpointing, the coda of every window but the last keeps only its input, and the fused
      head its input and log-sum-exp (recomputed in backward);
    * the step's last window is not recomputed (backward starts with it): it keeps its coda and head
      (the head's gradients, computed in its forward) and, under ``pass``, its whole core pass.

    The second number is what backward adds on top: nothing under ``pass`` (backward frees the last
    window's pass before it recomputes any other, and no region is larger), the largest recomputed
    block or coda under ``blocks:k``.
    """
    L = min(sleep.window, seq)
    costs = block_costs(model, batch, L, dtype, device)
    windows = math.ceil(seq / sleep.window)
    passes = (windows - 1) * sleep.passes + 1
    h_in = batch * L * model.config.d_model * torch.empty((), dtype=dtype).element_size()
    pre = sum(costs[i].saved for i in model.prelude_idx)
    coda = sum(costs[i].saved for i in model.coda_idx)
    core = [costs[i] for i in model.core_idx]
    full_pass = sum(c.saved for c in core)
    head_fwd = head_saved(model, batch, L, dtype, device, grad_in_forward=True)
    if not sleep.checkpoint:
        return windows * (pre + coda + head_fwd) + passes * full_pass, 0
    k = getattr(sleep, "checkpoint_blocks", None)
    if k is None:
        per_pass, recompute, last_core = h_in + sum(c.state for c in core), full_pass, full_pass
    else:
        per_pass = sum(h_in + c.state if n % k == 0 else c.saved for n, c in enumerate(core))
        recompute = max(c.saved for n, c in enumerate(core) if n % k == 0)
        last_core = per_pass
    last = pre + last_core + coda + head_fwd
    extra = 0 if k is None else recompute if windows == 1 else max(recompute, coda)
    if windows == 1:
        return last, extra
    head_rec = head_saved(model, batch, L, dtype, device, grad_in_forward=False)
    earlier = pre + (h_in if model.coda_idx else 0) + head_rec
    stored = (windows - 1) * earlier + (passes - 1) * per_pass + last
    return stored, extra


def activation_bytes(model, sleep, batch: int, seq: int, dtype: torch.dtype, device="meta") -> int:
    return sum(activation_parts(model, sleep, batch, seq, dtype, device))


def model_state_bytes(params: int, largest_layer: int, stage: int, world: int, precision: str,
                      keep_gathered: bool = False) -> dict[str, int]:
    """Per-GPU bytes of weights, gradients and optimizer state (Adam), by ZeRO stage.

    ``keep_gathered`` (ZeRO-3 only): each weight stays gathered for the whole micro-batch
    (``deepspeed.zero3_keep_gathered``), so a full copy of the weights in their dtype is live per GPU."""
    gathered = {} if stage != 3 or not keep_gathered else {
        "kept gathered weights": (2 if precision == "bf16" else 4) * params}
    if precision == "bf16":  # DeepSpeed's accounting: 16-bit weights and grads, fp32 master + 2 moments
        total = {0: 20 * params, 1: 4 * params + 16 * params // world,
                 2: 2 * params + 18 * params // world,
                 3: 4 * largest_layer + 18 * params // world}[stage]
        return {"model states": total, **gathered}
    # fp32 weights and grads, Adam's 2 fp32 moments, plus autocast's bf16 weight copies in the forward
    weights = 4 * params if stage < 3 else 4 * params // world + 4 * largest_layer
    grads = 4 * params if stage < 2 else 4 * params // world
    optim = 8 * params if stage == 0 else 8 * params // world
    states = {"weights": weights, "gradients": grads, "optimizer": optim}
    if precision == "autocast":
        states["autocast weight copies"] = 2 * params
    return {**states, **gathered}


def config_precision(exp) -> str:
    """The plan's precision for an experiment's ``train.precision`` on a GPU."""
    return {"bf16": "bf16", "fp32": "fp32"}.get(exp.train.precision, "autocast")  # auto = autocast on CUDA


def step_flops(model, costs: list[BlockCost], sleep, seq: int, tokens: int) -> tuple[float, float]:
    """(model FLOPs, FLOPs including recomputation) of one optimizer step over ``tokens`` tokens.
    Recomputed when checkpointing: every core pass but the step's last, and the coda and the head's
    logits of every window but the last (``activation_parts`` has the structure)."""
    cfg = model.config
    windows = math.ceil(seq / sleep.window)
    runs = ((windows - 1) * sleep.passes + 1) / windows  # core passes per window, averaged
    L = min(sleep.window, seq)
    head = 2 * cfg.d_model * cfg.vocab_size
    part = {"prelude": 0.0, "core": 0.0, "coda": 0.0}
    for i, c in enumerate(costs):
        attn = 0
        if model.layers[i].kind == "attn":  # QK^T and PV over ~L/2 keys on average (causal window)
            attn = 2 * 2 * cfg.attn.n_heads * cfg.attn_head_dim * (L / 2)
        where = "core" if i in model.core_idx else "coda" if i in model.coda_idx else "prelude"
        part[where] += 2 * c.params + attn
    fwd = (head + part["prelude"] + runs * part["core"] + part["coda"]) * tokens
    recompute = 0.0
    if sleep.checkpoint:
        recomputed_passes = (windows - 1) * sleep.passes / windows  # per window, averaged
        recompute = (recomputed_passes * part["core"] + (windows - 1) / windows * (part["coda"] + head)) * tokens
    return 3 * fwd, 3 * fwd + recompute


def zero_stage(exp) -> int:
    if exp.deepspeed.zero_stage is not None:
        return exp.deepspeed.zero_stage
    path = Path(exp.deepspeed.config)
    try:
        return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{exp.source}: deepspeed.config {path}: cannot read the ZeRO stage ({exc})") from exc


def batch_problems(exp, world: int) -> list[str]:
    t = exp.train
    if t.global_batch_size % (t.micro_batch_size * world):
        return [f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
                f"{t.micro_batch_size} x {world} ranks = {t.micro_batch_size * world}"]
    return []


def plan(config: str, nodes: int, gpus_per_node: int, gpu_mem_gib: float, precision: str | None = None,
         seq: int | None = None, overhead_gib: float = 2.0, kernels: str = "cuda", overrides=(),
         device="meta") -> dict:
    from megasleep.models import HybridLM
    from megasleep.models.precision import cast_parameters
    from megasleep.train.config import load_experiment

    exp = load_experiment(config, overrides)
    world = nodes * gpus_per_node
    precision = precision or config_precision(exp)
    seq = seq or exp.data.loader.seq_len or exp.sleep.window
    with torch.device(device):
        model = HybridLM(exp.model_cfg)
    act_dtype = torch.bfloat16 if precision in ("bf16", "autocast") and device == "meta" else torch.float32
    if act_dtype == torch.bfloat16:
        cast_parameters(model)
    params = model.num_parameters()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    stage = zero_stage(exp)
    states = model_state_bytes(params, largest, stage, world, precision, exp.deepspeed.zero3_keep_gathered)
    b = exp.train.micro_batch_size
    with fused_scan_accounting() if kernels == "cuda" else contextlib.nullcontext():
        acts = activation_bytes(model, exp.sleep, b, seq, act_dtype, device)
        costs = block_costs(model, b, min(exp.sleep.window, seq), act_dtype, device)
    tokens = exp.train.global_batch_size * seq
    model_flops, hw_flops = step_flops(model, costs, exp.sleep, seq, tokens)
    total = sum(states.values()) + acts + overhead_gib * GIB
    return {"config": config, "world": world, "zero_stage": stage, "precision": precision, "params": params,
            "kernels": kernels, "micro_batch": b, "seq": seq, "window": exp.sleep.window, "passes": exp.sleep.passes,
            "checkpointing": policy_name(exp.sleep), "model_states": states, "activations": acts,
            "overhead": int(overhead_gib * GIB), "total": int(total), "gpu_mem": int(gpu_mem_gib * GIB),
            "fits": total <= gpu_mem_gib * GIB, "batch_problems": batch_problems(exp, world),
            "tokens_per_step": tokens, "model_flops_per_step": model_flops, "flops_per_step": hw_flops}


def policy_name(sleep) -> str:
    if not sleep.checkpoint:
        return "none"
    k = getattr(sleep, "checkpoint_blocks", None)
    return "per (window, pass)" if k is None else f"every {k} block(s)"


def format_plan(p: dict) -> str:
    gib = lambda x: f"{x / GIB:.2f} GiB"  # noqa: E731
    lines = [f"{p['config']}: {p['params'] / 1e9:.3f} B parameters, ZeRO-{p['zero_stage']}, {p['world']} GPUs, "
             f"precision {p['precision']}",
             f"  micro-batch {p['micro_batch']} x {p['seq']} tokens, window {p['window']}, N={p['passes']}, "
             f"activation checkpointing {p['checkpointing']}, SSM scans counted as the {p['kernels']} kernels"]
    lines += [f"  {k:<24} {gib(v)}" for k, v in p["model_states"].items()]
    lines += [f"  {'activations':<24} {gib(p['activations'])}",
              f"  {'CUDA context, workspace':<24} {gib(p['overhead'])} (assumed)",
              f"  {'total per GPU':<24} {gib(p['total'])} of {gib(p['gpu_mem'])}: "
              f"{'fits' if p['fits'] else 'DOES NOT FIT'}",
              f"  step: {p['tokens_per_step']:,} tokens, {p['model_flops_per_step']:.3e} model FLOPs "
              f"({p['flops_per_step']:.3e} with recomputation)"]
    lines += [f"  batch: {msg}" for msg in p["batch_problems"]] or ["  batch: divides the world size"]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG",
                   help="experiment YAML(s), then optional KEY=VALUE overrides applied to each, as for "
                        "`megasleep train` (e.g. sleep.checkpoint_blocks=1)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    p.add_argument("--precision", choices=["fp32", "autocast", "bf16"], default=None,
                   help="default: the config's train.precision (auto = autocast on a GPU); autocast: fp32 "
                        "weights + bf16 autocast; bf16: bf16 parameters with fp32 master weights")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: data.loader.seq_len)")
    p.add_argument("--overhead-gib", type=float, default=2.0)
    p.add_argument("--kernels", choices=["cuda", "torch"], default="cuda",
                   help="count SSM-scan activations as the fused CUDA kernels (default) or the torch path")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def main(args) -> int:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise ValueError(f"--nodes={args.nodes} and --gpus-per-node={args.gpus_per_node} must be >= 1")
    configs = [c for c in args.configs if "=" not in c]
    overrides = [c for c in args.configs if "=" in c]
    if not configs:
        raise ValueError("megasleep plan: name at least one experiment YAML")
    plans = [plan(c, args.nodes, args.gpus_per_node, args.gpu_mem, args.precision, args.seq, args.overhead_gib,
                  args.kernels, overrides) for c in configs]
    print(json.dumps(plans, indent=1) if args.json else "\n\n".join(format_plan(p) for p in plans))
    return 0 if all(p["fits"] and not p["batch_problems"] for p in plans) else 1
