"""DeepSpeed around the sleep forward: the JSON the engine gets, the module it wraps, ZeRO-3 plumbing.

Contract: :func:`build_ds_config` is pure (it reads the JSON file, nothing else: no process group, no
engine) and raises one :class:`~megasleep.config.ConfigError` line naming the file, the key(s) and,
for batch settings, the world size. The trainer and the preflight (``megasleep train --check-only``)
both call it, so an impossible setting is refused before any rank starts. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import difflib
import time
from typing import Any

import torch
from torch import nn

from megasleep.config import ConfigError
from megasleep.sleep import SleepConfig, SleepOutput
from megasleep.sleep.loop import SleepRunner

# top-level sections of a DeepSpeed JSON that deepspeed.runtime.constants does not list (they live in
# each feature's own constants module); together they are every key DeepSpeed 0.19 reads
DS_SECTIONS = {"zero_optimization", "activation_checkpointing", "flops_profiler", "comms_logger", "tensorboard",
               "wandb", "csv_monitor", "comet", "aio", "data_efficiency", "compression_training", "elasticity",
               "autotuning", "amp", "sparse_attention", "pipeline", "timers", "compile", "nebula",
               "curriculum_learning", "hybrid_engine", "weight_quantization", "eigenvalue", "quantize_training",
               "progressive_layer_drop", "mics_shard_size", "graph_harvesting", "bf16", "fp16", "checkpoint"}
# the experiment config owns these: the JSON may only say "auto" (or agree)
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping")


def known_ds_keys() -> set[str]:
    import deepspeed.runtime.constants as constants

    own = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and not k.endswith("_DEFAULT")}
    return own | DS_SECTIONS


def check_batch(cfg, world_size: int) -> int:
    """Gradient-accumulation steps of ``cfg.train`` at ``world_size`` ranks; an impossible split is one
    error line naming the config, the keys and the world size."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if world_size < 1 or t.global_batch_size % per_step:
        raise ConfigError(
            f"{cfg.source}: train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size} x world size {world_size} (= {per_step}); pick a global "
            f"batch that is a multiple of {per_step}, or another micro-batch / number of ranks")
    return t.global_batch_size // per_step


def read_ds_json(cfg) -> tuple[str, dict[str, Any]]:
    """(path, JSON with ``deepspeed.overrides`` and ``deepspeed.zero_stage`` merged), keys validated."""
    from megasleep.config import deep_update, read_config_file, resolve_path

    ds = cfg.deepspeed
    path = resolve_path(ds.config)
    if not path.is_file():
        raise ConfigError(f"{cfg.source}: deepspeed.config: {ds.config}: no such DeepSpeed JSON")
    conf = read_config_file(path)
    deep_update(conf, ds.overrides)
    if ds.zero_stage is not None:
        conf.setdefault("zero_optimization", {})["stage"] = ds.zero_stage
    known = known_ds_keys()
    for key in conf:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"{path}: {key}: unknown DeepSpeed key (DeepSpeed would ignore it)"
                              + (f"; did you mean {near[0]!r}?" if near else ""))
    _check_zero_section(path, conf.get("zero_optimization", {}))
    return str(path), conf


def _check_zero_section(path, zero) -> None:
    from pydantic import ValidationError

    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization: expected an object, got {type(zero).__name__}")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in ("zero_optimization", *err["loc"]))
        raise ConfigError(f"{path}: {key}: {err['msg']} (got {err.get('input')!r})") from None


def build_ds_config(cfg, world_size: int, precision: str | None = None) -> dict[str, Any]:
    """The JSON DeepSpeed gets: ``deepspeed.config`` with overrides merged, the batch and clipping keys
    filled from the experiment, settings the experiment owns refused where the JSON sets them, and the
    precision keys of ``precision`` (default: ``train.precision`` resolved for the device the run gets)."""
    from megasleep.models.precision import deepspeed_precision, resolve_precision
    from megasleep.train.distributed import wants_cuda

    path, conf = read_ds_json(cfg)
    for key in ("optimizer", "scheduler", "fp16", "amp"):
        if key in conf and (key != "fp16" or conf[key].get("enabled")):
            raise ConfigError(f"{path}: '{key}' is set by the experiment config (optim / train.precision), "
                              "remove it from the DeepSpeed JSON")
    if conf.get("bf16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: bf16.enabled: precision is train.precision (bf16 = bf16 weights with fp32 "
                          "master weights, bf16-autocast = autocast over fp32 weights); set it to \"auto\" or "
                          "remove it")
    conf.pop("bf16", None)
    precision = precision or resolve_precision(cfg.train.precision, wants_cuda(cfg))
    for key, value in deepspeed_precision(precision, zero_stage(conf), cfg.source).items():
        if key in conf:
            raise ConfigError(f"{path}: '{key}' is set by train.precision={precision}, remove it from the JSON")
        conf[key] = value
    t = cfg.train
    wanted = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
              "gradient_accumulation_steps": check_batch(cfg, world_size), "gradient_clipping": cfg.optim.grad_clip}
    for key in BATCH_KEYS:
        if key in conf and conf[key] != "auto" and conf[key] != wanted[key]:
            raise ConfigError(f"{path}: {key}={conf[key]} conflicts with the experiment ({wanted[key]} at world "
                              f"size {world_size}); use \"auto\" or remove it")
        conf[key] = wanted[key]
    zero = conf.get("zero_optimization", {})
    if zero.get("stage") == 3 and cfg.deepspeed.zero3_keep_gathered:
        keep_gathered(zero, model_parameters(cfg))
    if cfg.optim.name == "muon" and zero.get("stage") == 3:
        if zero.get("reduce_scatter") is True:
            raise ConfigError(f"{path}: zero_optimization.reduce_scatter=true: DeepSpeed's ZeRO-3 Muon "
                              "cannot reduce-scatter (it needs whole gradients); set it to false")
        zero["reduce_scatter"] = False
    conf.setdefault("steps_per_print", 10**9)
    conf.setdefault("wall_clock_breakdown", False)
    return conf


def model_parameters(cfg) -> int:
    """Parameters of the experiment's model, counted on the meta device (no memory, no weights)."""
    from megasleep.models import HybridLM

    with torch.device("meta"):
        return HybridLM(cfg.model).num_parameters()


def keep_gathered(zero: dict[str, Any], n_params: int) -> None:
    """ZeRO-3 releases a gathered weight after its module ran unless DeepSpeed's trace says it is used
    again within ``stage3_max_reuse_distance`` elements, with at most ``stage3_max_live_parameters``
    gathered. The sleep loop runs every core block once per (window, pass) and again in backward, so
    below the model's size each pass regathers the core. At or above it each weight is gathered once
    per micro-batch (measured: tests/train/test_zero3_gathers.py)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    resolved = DeepSpeedZeroConfig(**zero)  # DeepSpeed's defaults where the JSON is silent
    for key, field in (("stage3_max_live_parameters", "max_live_parameters"),
                       ("stage3_max_reuse_distance", "max_reuse_distance")):
        zero[key] = max(int(getattr(resolved, field)), n_params)


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


class TimedSleepRunner(SleepRunner):
    """The sleep loop, timing the sleep passes (passes 2..N) of the forward."""

    def __init__(self, model, cfg: SleepConfig, sync: bool = False):
        super().__init__(model, cfg)
        self.sync = sync  # CUDA: synchronise around the timed part (only on logged steps)
        self.sleep_seconds = 0.0

    def sleep(self, *args, **kwargs):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = super().sleep(*args, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        self.sleep_seconds += time.perf_counter() - t0
        return out


class SleepTrainModule(nn.Module):
    """What DeepSpeed wraps: HybridLM + the sleep forward (so ZeRO-3's hooks see every call)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.time_sleep = False

    def forward(self, input_ids, loss_mask, doc_ids, sleep_cfg: SleepConfig, step: int | None = None,
                return_logits: bool = False, runner_cls: type[SleepRunner] | None = None) -> SleepOutput:
        """``runner_cls``: another sleep loop to run through the engine (the validator's scoring runner)."""
        runner = (TimedSleepRunner(self.model, sleep_cfg, sync=self.time_sleep and input_ids.is_cuda)
                  if runner_cls is None else runner_cls(self.model, sleep_cfg))
        ctx = (torch.autocast(input_ids.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        t0 = time.perf_counter()
        with ctx:
            out = runner(input_ids, loss_mask, doc_ids, step, return_logits)
        if getattr(runner, "sync", False):
            torch.cuda.synchronize()
        out.extras["forward_seconds"] = time.perf_counter() - t0
        out.extras["sleep_seconds"] = getattr(runner, "sleep_seconds", 0.0)
        return out


def register_external_params(model: nn.Module) -> None:
    """Make ZeRO-3 work with the mixers' recurrent structure.

    ZeRO-3 gathers a module's parameters in its forward pre-hook and releases them in its post-backward
    hook. Two kinds escape that: short-conv weights the mixers read directly (not through
    ``Conv1d.forward``), and parameters a mixer uses in its own body (``A_log``, ``dt_bias``, ``D``),
    whose gradient also arrives through the recurrent state that crosses windows inside a
    ``LayerCache`` DeepSpeed's hooks do not see (observed: a "size of tensor a (0)" error in
    backward). Both are small: register them as external parameters of the mixer and flag them
    ``is_external_param`` so they stay gathered until the optimizer step repartitions everything.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for parent in model.modules():
        children = list(parent.children())
        own = list(parent.parameters(recurse=False)) if children else []
        convs = [p for c in children if isinstance(c, nn.Conv1d) for p in c.parameters(recurse=False)]
        for p in own + convs:
            register_external_parameter(parent, p)
            p.is_external_param = True


def reinit_partitioned(model: nn.Module, rank: int) -> None:
    """Redo ``HybridLM.reset_parameters`` after ``zero.Init`` partitioned the model: the same init plan
    (same draws, same order), one module at a time on gathered parameters (rank 0 writes, every rank
    receives), so a zero_init model starts from exactly the weights of an ordinary one."""
    import deepspeed

    for mod, std in model.init_plan():
        with deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)), modifier_rank=0):
            if rank == 0:
                model.init_module(mod, std)


def initialize(module: nn.Module, optimizer, ds_config: dict[str, Any], model: nn.Module):
    """``deepspeed.initialize``; then ZeRO-3's external parameters (initialize resets that registry)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    if zero_stage(ds_config) == 3:
        register_external_params(model)
    return engine


def load_exported_weights(model: nn.Module, path: str, rank: int, zero3: bool) -> None:
    """``checkpoint.init_from``: an exported directory's weights into ``model`` (shapes must match;
    tensors the directory lacks keep their fresh init and are reported). Under zero.Init every
    tensor is gathered, rank 0 writes it, every rank receives its partition."""
    import sys

    from megasleep.checkpoint.weights import load_weights
    from megasleep.config import resolve_path

    state = load_weights(resolve_path(path))
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(state) - ({"lm_head.weight"} if model.config.tie_embeddings else set()))
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ConfigError(f"checkpoint.init_from: {path}: tensors this model does not have: {unexpected[:8]}")
    for name, t in state.items():
        p = own[name]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(t.shape) != shape:
            raise ConfigError(f"checkpoint.init_from: {path}: {name} has shape {tuple(t.shape)}, "
                              f"the model wants {shape}")
        gathered = contextlib.nullcontext()
        if zero3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters([p], modifier_rank=0)
        with gathered, torch.no_grad():
            if rank == 0 or not zero3:
                p.copy_(t)
    if rank == 0:
        print(f"[megasleep] initialised {len(state)} tensors from {path}"
              + (f"; {len(missing)} keep their fresh init: {missing[:6]}{' ...' if len(missing) > 6 else ''}"
                 if missing else ""), file=sys.stderr, flush=True)
