"""The Trainer: DeepSpeed (ZeRO 0-3) around the sleep forward, built from small overridable steps.

    trainer = Trainer(load_experiment("configs/experiments/tiny-demo.yaml", ["sleep.passes=2"]))
    status = trainer.train()          # "done" | "preempted" | "time_limit"; raises TrainingFailed
    trainer.close()                   # barrier + destroy_process_group on every rank

Steps (override one to change one behaviour): ``setup_distributed``, ``build_tokenizer``,
``build_model``, ``build_data``, ``build_eval_data``, ``build_optimizer``, ``build_engine``,
``forward_backward``, ``optimizer_step``, ``train_step``, ``log``, ``evaluate``, ``save``,
``state_dict`` / ``load_state_dict``, ``export``.

A step: fetch this rank's micro-batches; all-reduce the number of target tokens of the whole global
batch; forward/backward every micro-batch with ``loss_sum * (accum * world) / global_tokens`` (so the
update is the mean over every target token of the global batch, whatever the rank / accumulation
split: this is what makes 1-process and 2-process runs agree); set the lr from the schedule; step.
A step whose loss or gradients are not finite is skipped (DeepSpeed's overflow check; ``guard_nonfinite``
without ZeRO) and logged; ``train.max_bad_steps`` in a row stop the run with ``TrainingFailed`` and
the last good checkpoint untouched.

Stopping: SIGTERM / SIGUSR1 / SIGINT, a ``STOP`` file in the run directory, or
``train.time_limit_minutes`` set a flag that is all-reduced at the end of every step; then every rank
saves the checkpoint of that step and ``train()`` returns "preempted" (``status.json`` says so too:
``launch/pretrain.sh`` reads it to decide whether to requeue).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megasleep.config import ConfigError
from megasleep.sleep import SleepConfig, SleepOutput
from megasleep.sleep.loop import SleepRunner
from megasleep.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from megasleep.train.config import ExperimentConfig, dump_yaml, resolve_path
from megasleep.train.metrics import FlopCounter, MetricLogger, peak_flops, peak_memory_gb

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class TrainingFailed(RuntimeError):
    """Too many non-finite steps in a row (the last good checkpoint is left as it was)."""


class TimedSleepRunner(SleepRunner):
    """The sleep loop, timing the sleep passes (passes 2..N) of the forward."""

    sync = False

    def sleep(self, *args, **kwargs):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = super().sleep(*args, **kwargs)
        if self.sync:
            torch.cuda.synchronize()
        self.sleep_seconds = getattr(self, "sleep_seconds", 0.0) + time.perf_counter() - t0
        return out


class SleepTrainModule(nn.Module):
    """What DeepSpeed wraps: HybridLM + the sleep forward (so ZeRO-3's hooks see every call)."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.time_sleep = False

    def forward(self, input_ids, loss_mask, doc_ids, sleep_cfg: SleepConfig, step: int | None = None,
                return_logits: bool = False) -> SleepOutput:
        runner = TimedSleepRunner(self.model, sleep_cfg)
        runner.sync = self.time_sleep and input_ids.is_cuda
        ctx = (torch.autocast(input_ids.device.type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        t0 = time.perf_counter()
        with ctx:
            out = runner(input_ids, loss_mask, doc_ids, step, return_logits)
        if runner.sync:
            torch.cuda.synchronize()
        out.extras["forward_seconds"] = time.perf_counter() - t0
        out.extras["sleep_seconds"] = getattr(runner, "sleep_seconds", 0.0)
        return out


def register_external_params(model: nn.Module) -> None:
    """Make ZeRO-3 work with the mixers' recurrent structure.

    ZeRO-3 gathers a module's parameters in its forward pre-hook and releases them in its post-
    backward hook (when the gradient of the module's *inputs* is ready). Two kinds of parameters
    escape that: (1) the short-conv weights, which the mixers read directly (``ShortConv.run``,
    ``Mamba2`` reading ``conv1d.weight``) instead of calling ``Conv1d.forward``; (2) parameters a
    mixer uses in its own body (``A_log``, ``dt_bias``, ``D``): their gradient also arrives through
    the recurrent state, which crosses windows inside a ``LayerCache`` that DeepSpeed's hooks do not
    see, so it can be accumulated after the mixer's parameters were released (observed: a
    "size of tensor a (0)" error in backward). Both are small (O(d_model) numbers): we register them
    as external parameters of the mixer (fetched with it) and flag them ``is_external_param`` so
    the coordinator keeps them gathered until the optimizer step repartitions everything.
    """
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for parent in model.modules():
        children = list(parent.children())
        own = list(parent.parameters(recurse=False)) if children else []
        convs = [p for c in children if isinstance(c, nn.Conv1d) for p in c.parameters(recurse=False)]
        for p in own + convs:
            register_external_parameter(parent, p)
            p.is_external_param = True


def quiet_libraries() -> None:
    """DeepSpeed logs every init at INFO; keep warnings and errors only (MEGASLEEP_DS_VERBOSE=1 keeps all)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.*", category=FutureWarning)
    if os.environ.get("MEGASLEEP_DS_VERBOSE"):
        return
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # our root module returns a SleepOutput dataclass; ZeRO-3's hooks on the root are not needed
    # (it owns no parameters), and the mixers' hidden-state parameters are handled by
    # register_external_params
    ds_logger.addFilter(lambda rec: "unknown inputs or outputs type" not in rec.getMessage())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Trainer:
    def __init__(self, cfg: ExperimentConfig, eval_only: bool = False):
        self.cfg = cfg
        self.eval_only = eval_only
        self.t_start = time.time()
        self.preflight()
        self.setup_distributed()
        self.run_dir = cfg.run_path
        self.ckpt_dir = cfg.checkpoint_path
        self._stop_reason: str | None = None
        self.install_signal_handlers()
        self.prepare_run_dir()
        self.seed_everything(cfg.train.seed)
        self.tokenizer = self.build_tokenizer()
        self.model = self.build_model()
        self.train_data = self.build_data()
        self.eval_batches = self.build_eval_data()
        self.optimizer = self.build_optimizer()
        self.engine = self.build_engine()
        self.flops = FlopCounter(self.model)
        self.peak_flops, self.peak_source = peak_flops(self.device, cfg.logging.peak_tflops)
        self.ckpt = CheckpointManager(self.ckpt_dir, cfg.checkpoint.keep_last, self.rank, self.world,
                                      self.barrier, fault=cfg.train.fault)
        self.step = 0
        self.tokens_seen = 0
        self.bad_in_row = 0
        self.last_saved_step = -1
        self.history: list[dict] = []  # every step's global loss (tests compare runs step for step)
        self.resumed_from = self.maybe_resume()
        self.metrics = MetricLogger(self.run_dir, cfg.logging, self.rank == 0, cfg.train.steps, self.step,
                                    experiment=cfg.resolved())
        self.describe()

    # ------------------------------------------------------------------ setup
    def preflight(self) -> None:
        """Cheap checks of every path the run needs, before any process group or model exists, so
        that a typo fails in a second with the path in the message."""
        cfg = self.cfg
        if not resolve_path(cfg.deepspeed.config).is_file():
            raise ConfigError(f"{cfg.source}: deepspeed.config: {cfg.deepspeed.config}: no such DeepSpeed JSON")
        if cfg.data.tokenizer and not resolve_path(cfg.data.tokenizer).is_file():
            raise FileNotFoundError(f"data.tokenizer: {cfg.data.tokenizer}: no such tokenizer model")
        if cfg.data.source == "shards":
            from megasleep.data.manifest import resolve_shards

            for key in ("train", "val"):
                paths = getattr(cfg.data, key)
                if paths:
                    try:
                        resolve_shards(paths)
                    except FileNotFoundError as exc:
                        raise type(exc)(f"data.{key}: {exc}") from None
        if cfg.checkpoint.init_from and not (resolve_path(cfg.checkpoint.init_from) / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint.init_from: {cfg.checkpoint.init_from}: not an exported model "
                                    "directory (no config.json)")
        resolve_resume(cfg.checkpoint.resume, cfg.checkpoint_path)  # a missing resume path fails here

    def setup_distributed(self) -> None:
        """One process per device. Plain `python` (no launcher) gets a 1-rank group on a free port."""
        cfg = self.cfg.train
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{self.cfg.source}: train.device=cuda but CUDA is not available")
        if not want_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        quiet_libraries()
        import deepspeed

        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
            if not os.environ.get("MEGASLEEP_TORCH_COMPILE"):
                # DeepSpeed's Muon wraps its Newton-Schulz iteration in torch.compile; on CPU that means
                # an inductor C++ build per matrix shape (minutes for a tiny model), for no gain here
                from torch._dynamo import config as dynamo_config

                dynamo_config.disable = True
            if not self.cfg.deepspeed.shm_comm:
                # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU on first use (~40 s per venv
                # path); gloo gives the same results, and CPU runs here are small. Opt in with
                # deepspeed.shm_comm=true. (deepspeed.ops documents edits of this dict as persistent.)
                import deepspeed.ops

                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if want_cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        prec = cfg.precision
        if prec == "auto":
            prec = "bf16" if want_cuda and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = prec
        self.autocast_dtype = torch.bfloat16 if prec == "bf16" else None

    def barrier(self) -> None:
        if dist.is_initialized() and self.world > 1:
            dist.barrier()

    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_reason = signal.Signals(signum).name

        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), handler)

    def prepare_run_dir(self) -> None:
        if self.rank == 0 and not self.eval_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
            # a STOP left by an earlier, stopped run is stale; one written after this launch started
            # (launch/pretrain.sh exports MEGASLEEP_LAUNCH_TIME) is a preemption that came early
            stop = self.run_dir / "STOP"
            launched = float(os.environ.get("MEGASLEEP_LAUNCH_TIME", self.t_start))
            if stop.exists() and stop.stat().st_mtime < launched:
                stop.unlink()
            self.write_status("running")
        self.barrier()

    def write_status(self, state: str, **extra) -> None:
        if self.rank != 0:
            return
        rec = {"state": state, "step": getattr(self, "step", 0), "steps": self.cfg.train.steps,
               "time": time.time(), "world_size": self.world, **extra}
        tmp = self.run_dir / "status.json.tmp"
        tmp.write_text(json.dumps(rec, indent=1))
        os.replace(tmp, self.run_dir / "status.json")

    def seed_everything(self, seed: int) -> None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def build_tokenizer(self):
        d = self.cfg.data
        if d.tokenizer:
            from megasleep.data.tokenizer import load_tokenizer

            path = resolve_path(d.tokenizer)
            if not path.is_file():
                raise FileNotFoundError(f"data.tokenizer: {d.tokenizer}: no such tokenizer model")
            return load_tokenizer(path)
        if d.source == "task":
            from megasleep.train.data import task_tokenizer

            return task_tokenizer(d.task.name, self.run_dir / "tokenizer", self.rank, self.barrier)
        from megasleep.train.data import manifest_tokenizer

        return manifest_tokenizer(d.train)  # shards: the one the manifest names (the loader checks hashes)

    def build_model(self) -> nn.Module:
        from megasleep.models import HybridLM

        mcfg = self.cfg.model_cfg
        if self.tokenizer is not None and self.tokenizer.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"{self.cfg.source}: model.vocab_size={mcfg.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size}, {self.tokenizer.path})")
        ds = self.cfg.deepspeed
        if ds.zero_init and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=self.deepspeed_config()):
                model = HybridLM(mcfg)
            self._reinit_partitioned(model)
        else:
            model = HybridLM(mcfg)
        if self.cfg.checkpoint.init_from:
            self._init_from(model, self.cfg.checkpoint.init_from)
        if self.cfg.optim.trainable is not None:
            import fnmatch

            pats = self.cfg.optim.trainable
            n_on = 0
            for name, p in model.named_parameters():
                p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in pats))
                n_on += p.requires_grad
            if n_on == 0:
                raise ConfigError(f"{self.cfg.source}: optim.trainable={pats} matches no parameter")
        return model.to(self.device)

    def _init_from(self, model: nn.Module, path: str) -> None:
        """Load an exported directory's weights (shapes must match; missing tensors are reported)."""
        from megasleep.checkpoint.weights import load_weights

        state = load_weights(resolve_path(path))
        own = dict(model.named_parameters())
        missing = sorted(set(own) - set(state) - ({"lm_head.weight"} if model.config.tie_embeddings else set()))
        unexpected = sorted(set(state) - set(own))
        if unexpected:
            raise ConfigError(f"checkpoint.init_from: {path}: tensors this model does not have: {unexpected[:8]}")
        zero3 = self.cfg.deepspeed.zero_init and self.zero_stage == 3
        for name, t in state.items():
            p = own[name]
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(t.shape) != shape:
                raise ConfigError(f"checkpoint.init_from: {path}: {name} has shape {tuple(t.shape)}, "
                                  f"the model wants {shape}")
            if zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.rank == 0:
                        with torch.no_grad():
                            p.copy_(t)
            else:
                with torch.no_grad():
                    p.copy_(t)
        if self.rank == 0:
            print(f"[megasleep] initialised {len(state)} tensors from {path}"
                  + (f"; {len(missing)} keep their fresh init: {missing[:6]}{' ...' if len(missing) > 6 else ''}"
                     if missing else ""), file=sys.stderr, flush=True)

    def _reinit_partitioned(self, model: nn.Module) -> None:
        """HybridLM.reset_parameters runs after zero.Init has partitioned the submodules: redo it one
        module at a time on gathered parameters (rank 0 writes, every rank receives)."""
        import deepspeed

        std = model.config.init_std
        out_std = std / math.sqrt(2 * len(model.layers))
        # the same draws in the same order as HybridLM.reset_parameters (Linear layers, then the
        # embedding): a zero_init model starts from exactly the weights of an ordinary one
        for name, mod in [*[(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)],
                          ("embed_tokens", model.embed_tokens)]:
            with deepspeed.zero.GatheredParameters(list(mod.parameters(recurse=False)), modifier_rank=0):
                if self.rank == 0:
                    last = name.rsplit(".", 1)[-1]
                    s = out_std if last in ("o_proj", "out_proj", "down_proj") else std
                    nn.init.normal_(mod.weight, std=s)
                    if isinstance(mod, nn.Linear) and mod.bias is not None:
                        nn.init.zeros_(mod.bias)

    def build_data(self):
        from megasleep.train.data import ShardStream, TaskStream

        d, t = self.cfg.data, self.cfg.train
        if d.source == "task":
            return TaskStream(d.task.name, self.tokenizer, seed=d.task.seed, split="train",
                              difficulty=d.task.difficulty, params=d.task.params,
                              micro_batch=t.micro_batch_size, global_batch=t.global_batch_size,
                              rank=self.rank, world=self.world)
        return ShardStream(d, micro_batch=t.micro_batch_size, global_batch=t.global_batch_size, rank=self.rank,
                           world=self.world, seed=t.seed, tokenizer_hash=self._tok_hash())

    def build_eval_data(self) -> list[dict]:
        """This rank's evaluation batches; every rank gets the same number (ZeRO-3 forwards are
        collective)."""
        batches = self._eval_batches()
        if self.world > 1:
            n = torch.tensor([len(batches)], device=self.device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            batches = batches[:int(n.item())]
        if not batches and self.rank == 0 and (self.cfg.eval.at_end or self.cfg.eval.every):
            print(f"[megasleep] warning: no evaluation batches (eval.samples={self.cfg.eval.samples}, "
                  f"batch size {self.cfg.eval.batch_size or self.cfg.train.micro_batch_size}, {self.world} ranks): "
                  "evaluation is skipped", file=sys.stderr, flush=True)
        return batches

    def _eval_batches(self) -> list[dict]:
        from megasleep.train.data import collate, task_eval_samples

        e, d = self.cfg.eval, self.cfg.data
        bs = e.batch_size or self.cfg.train.micro_batch_size
        if d.source == "task":
            samples = task_eval_samples(d.task.name, self.tokenizer, seed=d.task.seed,
                                        difficulty=d.task.eval_difficulty or d.task.difficulty,
                                        params=d.task.params, n=e.samples)
            mine = samples[self.rank::self.world]
            return [collate(mine[i:i + bs], self.tokenizer.pad_id) for i in range(0, len(mine), bs)]
        if not d.val:
            return []
        from megasleep.data.loader import build_loader
        from megasleep.train.data import as_batch, loader_config

        # every rank reads the whole (small) validation set and keeps batches rank, rank + world, ...
        loader = build_loader(loader_config(d, "val", bs, 0, self._tok_hash()), 0, 1)
        want = math.ceil(math.ceil(e.samples / bs) / self.world) * self.world  # batches, all ranks
        out = []
        for i, b in enumerate(loader):
            if i >= want:
                break
            if i % self.world == self.rank:
                out.append(as_batch(b))
        return out

    def _tok_hash(self) -> str | None:
        return self.tokenizer.hash if self.tokenizer is not None else None

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed_config().get("zero_optimization", {}).get("stage", 0))

    def deepspeed_config(self) -> dict[str, Any]:
        """The JSON of deepspeed.config, overrides merged, batch/clipping keys filled from the experiment."""
        if getattr(self, "_ds_config", None) is not None:
            return self._ds_config
        from megasleep.train.config import _deep_update

        ds, t = self.cfg.deepspeed, self.cfg.train
        path = resolve_path(ds.config)
        if not path.is_file():
            raise ConfigError(f"{self.cfg.source}: deepspeed.config: {ds.config}: no such DeepSpeed JSON")
        try:
            conf = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON: {exc}") from None
        _deep_update(conf, ds.overrides)
        if ds.zero_stage is not None:
            conf.setdefault("zero_optimization", {})["stage"] = ds.zero_stage
        for key in ("optimizer", "scheduler", "fp16", "amp"):
            if key in conf and (key != "fp16" or conf[key].get("enabled")):
                raise ConfigError(f"{path}: '{key}' is set by the experiment config (optim / train.precision), "
                                  "remove it from the DeepSpeed JSON")
        if conf.get("bf16", {}).get("enabled") not in (None, False, "auto"):
            raise ConfigError(f"{path}: bf16.enabled: precision is train.precision (bf16 = autocast with fp32 "
                              "master weights); set it to \"auto\" or remove it")
        conf.pop("bf16", None)
        accum = t.global_batch_size // (t.micro_batch_size * self.world)
        if accum * t.micro_batch_size * self.world != t.global_batch_size:
            raise ConfigError(
                f"{self.cfg.source}: train.global_batch_size={t.global_batch_size} is not divisible by "
                f"micro_batch_size={t.micro_batch_size} x world_size={self.world}")
        wanted = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
                  "gradient_accumulation_steps": accum, "gradient_clipping": self.cfg.optim.grad_clip}
        for key, val in wanted.items():
            if key in conf and conf[key] != "auto" and conf[key] != val:
                raise ConfigError(f"{path}: {key}={conf[key]} conflicts with the experiment ({val}); "
                                  "use \"auto\" or remove it")
            conf[key] = val
        zero = conf.get("zero_optimization", {})
        if self.cfg.optim.name == "muon" and zero.get("stage") == 3:
            if zero.get("reduce_scatter") is True:
                raise ConfigError(f"{path}: zero_optimization.reduce_scatter=true: DeepSpeed's ZeRO-3 Muon "
                                  "cannot reduce-scatter (it needs whole gradients); set it to false")
            zero["reduce_scatter"] = False
        conf.setdefault("steps_per_print", 10**9)
        conf.setdefault("wall_clock_breakdown", False)
        self._ds_config = conf
        return conf

    def build_optimizer(self) -> torch.optim.Optimizer:
        from megasleep.train.optim import build_optimizer, guard_nonfinite

        opt = build_optimizer(self.model, self.cfg.optim)
        if self.zero_stage == 0:
            guard_nonfinite(opt)
        return opt

    def build_engine(self):
        import deepspeed

        self.module = SleepTrainModule(self.model, self.autocast_dtype)
        engine, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer,
                                               config=self.deepspeed_config())
        if self.zero_stage == 3:  # after initialize: it resets every module's external-parameter registry
            register_external_params(self.model)
        self.accum = engine.gradient_accumulation_steps()
        return engine

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Goes into DeepSpeed's client_state (rank 0's copy is the one kept)."""
        s = self.cfg.sleep
        return {"megasleep": {
            "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
            "sleep_sampler": {"random_passes": s.random_passes, "random_seed": s.random_seed, "passes": s.passes,
                              "next_step": self.step},
            "model_cfg": self.cfg.model_cfg.model_dump(mode="json"),
            "tokenizer": self.tokenizer.info() if self.tokenizer is not None else None,
        }}

    def rank_state(self) -> dict[str, Any]:
        return {"data": self.train_data.state_dict(), "rng": rng_state(), "step": self.step}

    def load_state_dict(self, client: dict, rank_state: dict) -> None:
        st = client.get("megasleep")
        if st is None:
            raise CheckpointError("checkpoint has no megasleep client state (not written by this trainer?)")
        if st["model_cfg"] != self.cfg.model_cfg.model_dump(mode="json"):
            raise CheckpointError("the checkpoint's model config differs from this experiment's model; "
                                  "resume with the same model, or set checkpoint.resume=never")
        tok = st.get("tokenizer")
        if tok and self.tokenizer is not None and tok.get("hash") != self.tokenizer.hash:
            raise CheckpointError(f"the checkpoint was trained with tokenizer {tok.get('hash')} and this run "
                                  f"uses {self.tokenizer.hash} ({self.tokenizer.path})")
        sampler = st.get("sleep_sampler", {})
        s = self.cfg.sleep
        if (sampler.get("random_passes") and tuple(sampler["random_passes"]) != tuple(s.random_passes or ())) \
                or sampler.get("random_seed", s.random_seed) != s.random_seed:
            if self.rank == 0:
                print("[megasleep] warning: the random-N sampler settings changed since the checkpoint: "
                      "the resumed run draws other N than the original would have", file=sys.stderr, flush=True)
        self.step = int(st["step"])
        self.tokens_seen = int(st.get("tokens_seen", 0))
        self.train_data.load_state_dict(rank_state["data"])
        set_rng_state(rank_state["rng"])

    def maybe_resume(self) -> str | None:
        found = resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        if found is None:
            return None
        ckpt_dir, tag = found
        client, rank_state = self.ckpt.load(self.engine, ckpt_dir, tag)
        self.load_state_dict(client, rank_state)
        self.last_saved_step = self.step if Path(ckpt_dir) == self.ckpt_dir else -1
        return str(Path(ckpt_dir) / tag)

    def save(self) -> str:
        t0 = time.perf_counter()
        marker = {"config": self.cfg.resolved(), "zero_stage": self.zero_stage,
                  "tokenizer": self.tokenizer.info() if self.tokenizer is not None else None,
                  "tokenizer_path": (str(Path(self.tokenizer.path).resolve())
                                     if self.tokenizer is not None and self.tokenizer.path else None)}
        tag = self.ckpt.save(self.engine, self.step, self.state_dict(), self.rank_state(), marker)
        self.last_saved_step = self.step
        self.metrics.write(f"[megasleep] saved checkpoint {self.ckpt_dir / tag} ({time.perf_counter() - t0:.1f}s)")
        return tag

    # ------------------------------------------------------------------ steps
    def forward_backward(self, batch: dict, global_tokens: int) -> SleepOutput:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["loss_mask"].to(self.device, non_blocking=True)
        docs = batch["doc_ids"].to(self.device, non_blocking=True)
        out = self.engine(ids, mask, docs, self.cfg.sleep, self.step)
        loss = out.loss_sum * (self.accum * self.world / max(global_tokens, 1))
        if self.step + 1 in self.cfg.train.fault.nan_loss_steps:  # 1-based, as logged
            loss = loss * float("nan")
        self.engine.backward(loss)
        return out

    def optimizer_step(self) -> tuple[bool, float]:
        """Set the lr for this step and step (DeepSpeed applies it at the accumulation boundary)."""
        from megasleep.train.optim import lr_multiplier, set_lr

        mult = lr_multiplier(self.step, self.cfg.train.steps, self.cfg.optim)
        set_lr(self.optimizer, mult)
        own_norm = None
        if self.zero_stage == 0:  # DeepSpeed does not report the norm without ZeRO
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else float(norm)
        return applied, (float("nan") if norm is None else norm)

    def train_step(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batches = self.train_data.batches(self.step)
        t_data = time.perf_counter() - t0
        local_targets = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)
        tok = torch.tensor([local_targets], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(tok)
        global_targets = int(tok.item())
        self.module.time_sleep = (self.step + 1) % self.cfg.train.log_every == 0
        loss_sum = fwd_s = sleep_s = flops = 0.0
        n_tokens = input_tokens = 0
        windows: dict[int, list[float]] = {}
        for i, b in enumerate(batches):
            out = self.forward_backward(b, global_targets)
            loss_sum += float(out.loss_sum.detach())
            n_tokens += out.n_tokens
            B, T = b["input_ids"].shape
            input_tokens += B * T
            fwd_s += out.extras.get("forward_seconds", 0.0)
            sleep_s += out.extras.get("sleep_seconds", 0.0)
            flops += 3.0 * self.flops.forward_flops(B, T, self.cfg.sleep.window, self.cfg.sleep.eviction,
                                                     out.passes_used, out.window_tokens)
            for w, (lw, tw) in enumerate(zip(out.window_loss, out.window_tokens)):
                if tw:
                    acc = windows.setdefault(w, [0.0, 0.0])
                    acc[0] += lw * tw
                    acc[1] += tw
            if i < len(batches) - 1:
                self.engine.step()  # DeepSpeed wants step() after every backward; no-op inside accumulation
        applied, gnorm = self.optimizer_step()
        if self.cfg.train.fault.step_sleep:
            time.sleep(self.cfg.train.fault.step_sleep)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        stop_local = 1.0 if self._wants_stop() else 0.0
        budget = self.cfg.train.time_budget_minutes
        budget_local = 1.0 if self.rank == 0 and budget and time.time() - self.t_start > 60 * budget else 0.0
        vec = torch.tensor([loss_sum, n_tokens, input_tokens, flops, t_data, fwd_s, sleep_s, stop_local,
                            budget_local], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(vec)
        loss_sum_g, n_g, in_g, flops_g, data_g, fwd_g, sleep_g, stop_g, budget_g = vec.tolist()
        loss = loss_sum_g / max(n_g, 1)
        return {"loss": loss, "applied": applied, "grad_norm": gnorm, "lr": self.optimizer.param_groups[0]["lr"],
                "target_tokens": int(n_g), "input_tokens": int(in_g), "step_seconds": dt, "flops": flops_g,
                "data_share": data_g / self.world / dt, "sleep_share": sleep_g / fwd_g if fwd_g else 0.0,
                "passes": self.cfg.sleep.passes_for_step(self.step), "stop": stop_g > 0, "windows": windows,
                "budget_spent": budget_g > 0,
                "lrs": [g["lr"] for g in self.optimizer.param_groups]}

    def _wants_stop(self) -> bool:
        if self._stop_reason is None and self.rank == 0 and (self.run_dir / "STOP").exists():
            self._stop_reason = "STOP file"
        limit = self.cfg.train.time_limit_minutes
        if self._stop_reason is None and limit and time.time() - self.t_start > 60 * limit:
            self._stop_reason = "time_limit"
        return self._stop_reason is not None

    def log(self, rec: dict[str, Any], window_acc: dict[int, list[float]]) -> None:
        merged = window_acc
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, window_acc)
            merged = {}
            for g in gathered:
                for w, (a, b) in g.items():
                    m = merged.setdefault(w, [0.0, 0.0])
                    m[0] += a
                    m[1] += b
        dt = rec["step_seconds"]
        out = {"loss": rec["loss"], "grad_norm": rec["grad_norm"], "lr": rec["lr"], "passes": rec["passes"],
               "tokens_per_s": rec["input_tokens"] / dt, "target_tokens_per_s": rec["target_tokens"] / dt,
               "mfu": rec["flops"] / (dt * self.world * self.peak_flops),
               "sleep_share": rec["sleep_share"], "data_share": rec["data_share"],
               "peak_mem_gb": peak_memory_gb(self.device), "step_seconds": dt, "tokens_seen": self.tokens_seen,
               "skipped_steps": self.skipped, "window_loss": {str(w): merged[w][0] / merged[w][1] for w in sorted(merged)}}
        if len(rec["lrs"]) > 1:
            out["lr_groups"] = rec["lrs"]
        self.metrics.log(self.step, out)

    def evaluate(self) -> dict:
        from megasleep.train.evaluate import evaluate

        if not self.eval_batches:
            return {}
        self.engine.eval()

        def fwd(batch, sleep_cfg):
            return self.engine(batch["input_ids"], batch["loss_mask"], batch["doc_ids"], sleep_cfg, None, True)

        try:
            res = evaluate(fwd, self.eval_batches, self.cfg.sleep, self.cfg.eval.passes, self.device)
        finally:
            self.engine.train()
        from megasleep.train.evaluate import summary_line

        self.metrics.log(self.step, res, kind="eval")
        self.metrics.write(f"[eval step {self.step}] {summary_line(res)}")
        if self.rank == 0:
            with open(self.run_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, "results": res}) + "\n")
        return res

    def export(self) -> Path | None:
        from megasleep.checkpoint.deepspeed import consolidated_from_zero, export_state_dict

        out = self.run_dir / "export"
        if self.zero_stage == 3:
            if self.last_saved_step != self.step:
                self.save()
            state = consolidated_from_zero(self.ckpt_dir, None) if self.rank == 0 else None
        else:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.rank == 0 else None
        if self.rank == 0:
            tok = self.tokenizer.path if self.tokenizer is not None else None
            export_state_dict(state, self.cfg.model_cfg, out, tok, sleep=self.cfg.sleep.model_dump(mode="json"),
                              source={"kind": "megasleep-train", "run_dir": str(self.run_dir.resolve()),
                                      "step": self.step, "experiment": self.cfg.name})
            self.metrics.write(f"[megasleep] exported {out}")
        self.barrier()
        return out

    def describe(self) -> None:
        c = self.cfg
        n = self.model.num_parameters() if self.zero_stage < 3 else self.flops.params
        msg = (f"[megasleep] {c.name}: {c.model_cfg.name} {n / 1e6:.2f}M params, pattern {c.model_cfg.pattern}, "
               f"L={c.sleep.window} N={c.sleep.random_passes or c.sleep.passes} {c.sleep.eviction}; "
               f"{self.world} rank(s) on {self.device.type} ({self.precision}), ZeRO-{self.zero_stage}, "
               f"batch {c.train.global_batch_size} = {c.train.micro_batch_size} x {self.accum} accum x {self.world}; "
               f"optim {c.optim.name}; run dir {self.run_dir}"
               + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""))
        self.metrics.write(msg)

    # ------------------------------------------------------------------ loop
    @property
    def skipped(self) -> int:
        return getattr(self, "_skipped", 0)

    def train(self) -> str:
        cfg = self.cfg
        total = cfg.train.steps
        if self.step >= total:
            self.metrics.write(f"[megasleep] already at step {self.step} of {total}: nothing to train")
            self.finish()
            return "done"
        window_acc: dict[int, list[float]] = {}
        stopped = None
        while self.step < total:
            rec = self.train_step()
            self.tokens_seen += rec["input_tokens"]
            self.history.append({"step": self.step, "loss": rec["loss"], "applied": rec["applied"]})
            if rec["applied"]:
                self.bad_in_row = 0
            else:
                self.bad_in_row += 1
                self._skipped = self.skipped + 1
                self.metrics.log(self.step + 1, {"loss": rec["loss"], "grad_norm": rec["grad_norm"],
                                                 "bad_in_row": self.bad_in_row}, kind="skipped")
            for w, (a, b) in rec["windows"].items():
                m = window_acc.setdefault(w, [0.0, 0.0])
                m[0] += a
                m[1] += b
            self.step += 1
            self.metrics.advance()
            if self.bad_in_row >= cfg.train.max_bad_steps:
                self.write_status("failed", reason=f"{self.bad_in_row} non-finite steps in a row")
                raise TrainingFailed(f"{self.bad_in_row} non-finite steps in a row (steps {self.step - self.bad_in_row}"
                                     f"..{self.step - 1}); stopping. Last good checkpoint: "
                                     f"{self.ckpt_dir / (self.ckpt_dir / 'latest').read_text().strip()}"
                                     if (self.ckpt_dir / "latest").exists() else
                                     f"{self.bad_in_row} non-finite steps in a row; stopping (no checkpoint yet)")
            if self.step % cfg.train.log_every == 0 or self.step == total:
                self.log(rec, window_acc)
                window_acc = {}
            if rec["stop"]:
                stopped = self._stop_reason or "stop requested by another rank"
                break
            if rec["budget_spent"] and self.step < total:
                self.metrics.write(f"[megasleep] time budget of {cfg.train.time_budget_minutes} min spent at step "
                                   f"{self.step} of {total}: ending training here")
                self.ended_early = True
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total \
                    and self.bad_in_row == 0:
                self.save()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < total:
                self.evaluate()
        if stopped is not None:
            if self.last_saved_step != self.step:
                self.save()  # skipped (non-finite) steps left the weights untouched: still a good state
            state = "time_limit" if stopped == "time_limit" else "preempted"
            self.metrics.write(f"[megasleep] stopped at step {self.step} ({stopped}); checkpoint saved, "
                               "resume by running the same command again")
            self.write_status(state, reason=stopped)
            return state
        self.finish()
        return "done"

    def finish(self) -> None:
        if self.last_saved_step != self.step:
            self.save()
        if self.cfg.eval.at_end and self.eval_batches:
            res = self.evaluate()
            if self.rank == 0:
                (self.run_dir / "eval.json").write_text(json.dumps({"step": self.step, "results": res}, indent=1))
        if self.cfg.checkpoint.export:
            self.export()
        self.write_status("done", loss=self.history[-1]["loss"] if self.history else None,
                          seconds=round(time.time() - self.t_start, 1),
                          ended_early=bool(getattr(self, "ended_early", False)))

    def close(self) -> None:
        """End of the process group on every rank: barrier, then destroy (DeepSpeed's CPU exit crash
        otherwise; see ../shared/INSTALL-NOTES.md)."""
        with contextlib.suppress(Exception):
            self.metrics.close()
        with contextlib.suppress(Exception):
            self.train_data.close()
        shutdown_distributed()


def shutdown_distributed(barrier: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if barrier:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


def run(cfg: ExperimentConfig, eval_only: bool = False) -> int:
    """Train; the process exit status: 0 done or cleanly stopped (status.json tells which), 3 failed."""
    trainer = None
    ok = False
    try:
        if eval_only:
            cfg = cfg.model_copy(deep=True)
            cfg.checkpoint.resume = "auto" if cfg.checkpoint.resume == "never" else cfg.checkpoint.resume
            trainer = Trainer(cfg, eval_only=True)
            if trainer.resumed_from is None:
                raise CheckpointError(f"--eval-only: no complete checkpoint in {trainer.ckpt_dir}")
            res = trainer.evaluate()
            if trainer.rank == 0:
                (trainer.run_dir / "eval.json").write_text(
                    json.dumps({"step": trainer.step, "checkpoint": trainer.resumed_from, "results": res}, indent=1))
            ok = True
            return 0
        trainer = Trainer(cfg)
        trainer.train()
        ok = True
        return 0
    except TrainingFailed as exc:
        print(f"[megasleep] training failed: {exc}", file=sys.stderr, flush=True)
        ok = True  # every rank reaches this together: a clean shutdown is still possible
        return 3
    finally:
        if trainer is not None:
            trainer.close() if ok else shutdown_distributed(barrier=False)
        else:
            shutdown_distributed(barrier=False)
