"""The Trainer: the training loop, built from small overridable steps around DeepSpeed (ZeRO 0-3).

    trainer = Trainer(load_experiment("configs/experiments/tiny-demo.yaml", ["sleep.passes=2"]))
    status = trainer.train()          # "done" | "preempted" | "time_limit"; raises TrainingFailed
    trainer.close()                   # barrier + destroy_process_group on every rank

Contract: one step = fetch this rank's micro-batches, forward/backward each with the loss sum scaled
by (accum x world) / target tokens of the global batch (so the update is the mean over every target
token whatever the rank / accumulation split), set the lr, step. Concerns live in their own modules:
``engine`` (DeepSpeed JSON and module), ``distributed`` (process group), ``lifecycle`` (stop policy,
``status.json``), ``checkpoint``, ``metrics``. Override a step (``build_*``, ``forward_backward``,
``backward``, ``optimizer_step``, ``train_step``, ``log``, ``save``, ...) to change one behaviour.
Why and how (stopping, non-finite steps, divergence): docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megasleep.atomic import atomic_write
from megasleep.config import ConfigError, resolve_path
from megasleep.models.precision import (
    cast_parameters,
    casts_itself,
    check_dtypes,
    compile_blocks,
    planned_dtypes,
)
from megasleep.sleep import SleepOutput
from megasleep.train import engine as ds_engine
from megasleep.train.checkpoint import (
    LATEST,
    CheckpointError,
    CheckpointManager,
    data_record,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from megasleep.train.config import ExperimentConfig, dump_yaml
from megasleep.train.distributed import launcher_world_size, setup_distributed, shutdown_distributed
from megasleep.train.lifecycle import RunStatus, StopPolicy, check_steps_on_resume, unmark_checkpoint
from megasleep.train.metrics import (
    FlopCounter,
    MetricLogger,
    merge_window_sums,
    peak_flops,
    peak_memory_gb,
    step_metrics,
)
from megasleep.train.preflight import preflight


class TrainingFailed(RuntimeError):
    """Non-finite steps in a row, or a diverged loss (the last good checkpoint is left as it was)."""


class Trainer:
    def __init__(self, cfg: ExperimentConfig, eval_only: bool = False):
        self.cfg = cfg
        self.eval_only = eval_only
        self.t_start = time.time()
        self.run_dir = cfg.run_path
        self.ckpt_dir = cfg.checkpoint_path
        # training state (state_dict / load_state_dict carry step and tokens_seen)
        self.step = 0
        self.tokens_seen = 0
        self.bad_in_row = 0
        self.nonfinite_loss_in_row = 0  # of those, steps whose forward loss itself was not finite
        self.skipped = 0
        self.best_loss = math.inf
        self.ended_early = False
        self.last_saved_step = -1
        self.history: list[dict] = []  # every step's global loss (tests compare runs step for step)
        self.resumed_from: str | None = None
        # the checks of `megasleep train --check-only`, at the launcher's world size, before anything is built
        preflight(cfg, launcher_world_size())
        self.dist = setup_distributed(cfg)
        self.rank, self.world, self.device = self.dist.rank, self.dist.world, self.dist.device
        self.precision, self.autocast_dtype = self.dist.precision, self.dist.autocast_dtype
        self.ds_config = ds_engine.build_ds_config(cfg, self.world, self.precision)
        self.zero_stage = ds_engine.zero_stage(self.ds_config)
        self.accum = ds_engine.check_batch(cfg, self.world)
        self.stop = StopPolicy(self.run_dir, self.rank, self.t_start, cfg.train.time_limit_minutes,
                               cfg.train.time_budget_minutes)
        self.status = RunStatus(self.run_dir, self.rank, cfg.train.steps, self.world)
        self.stop.install_signal_handlers()
        try:
            self.prepare_run_dir()
            self.seed_everything(cfg.train.seed)
            self.tokenizer = self.build_tokenizer()
            self.model = self.build_model()
            self.train_data = self.build_data()
            self.validator = self.build_validator()
            self.optimizer = self.build_optimizer()
            self.module = ds_engine.SleepTrainModule(self.model, self.autocast_dtype)
            self.engine = self.build_engine()
            self.flops = FlopCounter(self.model)
            self.peak_flops, self.peak_source = peak_flops(self.device, cfg.logging.peak_tflops)
            self.ckpt = self.build_checkpointer()
            self.resumed_from = self.maybe_resume()
            self.status.step = self.step
            self.metrics = MetricLogger(self.run_dir, cfg.logging, self.rank == 0, cfg.train.steps, self.step,
                                        experiment=cfg.resolved())
            self.describe()
        except BaseException as exc:
            self.status.fail(exc)
            raise

    # ------------------------------------------------------------------ setup
    def barrier(self) -> None:
        self.dist.barrier()

    def prepare_run_dir(self) -> None:
        if self.rank == 0 and not self.eval_only:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.run_dir / "config.yaml", dump_yaml(self.cfg))  # a study may train from this file
            self.stop.clear_stale_stop_file()
            self.status.write("running")
        self.barrier()

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

            return load_tokenizer(resolve_path(d.tokenizer))  # the preflight checked that it exists
        if d.source == "task":
            from megasleep.train.data import task_tokenizer

            return task_tokenizer(d.task.name, self.run_dir / "tokenizer", self.rank, self.barrier)
        from megasleep.train.data import manifest_tokenizer

        return manifest_tokenizer(d.train)  # shards: the one the manifest names (the loader checks hashes)

    def build_model(self) -> nn.Module:
        from megasleep.models import HybridLM

        mcfg = self.cfg.model
        if self.tokenizer is not None and self.tokenizer.vocab_size > mcfg.vocab_size:
            raise ConfigError(f"{self.cfg.source}: model.vocab_size={mcfg.vocab_size} is smaller than the "
                              f"tokenizer's vocabulary ({self.tokenizer.vocab_size}, {self.tokenizer.path})")
        if self.cfg.deepspeed.zero_init and self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = HybridLM(mcfg)
            ds_engine.reinit_partitioned(model, self.rank)
        else:
            model = HybridLM(mcfg)
        if self.cfg.checkpoint.init_from:
            ds_engine.load_exported_weights(model, self.cfg.checkpoint.init_from, self.rank,
                                            zero3=self.cfg.deepspeed.zero_init and self.zero_stage == 3)
        if self.cfg.optim.trainable is not None:
            import fnmatch

            pats = self.cfg.optim.trainable
            n_on = 0
            for name, p in model.named_parameters():
                p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in pats))
                n_on += p.requires_grad
            if n_on == 0:
                raise ConfigError(f"{self.cfg.source}: optim.trainable={pats} matches no parameter")
        model = model.to(self.device)
        if casts_itself(self.precision, self.zero_stage):  # ZeRO-3: DeepSpeed's bf16 mode casts
            cast_parameters(model)
        if self.cfg.train.compile:
            compile_blocks(model, backend=self.cfg.train.compile_backend)
        return model

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

    def build_validator(self):
        from megasleep.eval.harness import CollectingRunner
        from megasleep.train.validate import build_validator

        def forward(ids, mask, docs, sleep_cfg):  # through the engine: ZeRO-3 gathers parameters as in training
            return self.engine(ids, mask, docs, sleep_cfg, None, False, runner_cls=CollectingRunner)

        return build_validator(self.cfg, self.tokenizer, forward, self.rank, self.world, self.device,
                               model=self.model, zero3=self.zero_stage == 3)

    def _tok_hash(self) -> str | None:
        return self.tokenizer.hash if self.tokenizer is not None else None

    def build_optimizer(self) -> torch.optim.Optimizer:
        from megasleep.train.optim import build_optimizer, guard_nonfinite

        opt = build_optimizer(self.model, self.cfg.optim)
        if self.zero_stage == 0:
            guard_nonfinite(opt)
        return opt

    def build_engine(self):
        engine = ds_engine.initialize(self.module, self.optimizer, self.ds_config, self.model)
        assert engine.gradient_accumulation_steps() == self.accum, "DeepSpeed planned another accumulation"
        check_dtypes(self.model, planned_dtypes(self.model, self.precision, self.zero_stage))
        return engine

    def build_checkpointer(self) -> CheckpointManager:
        return CheckpointManager(self.ckpt_dir, self.cfg.checkpoint.keep_last, self.rank, self.world, self.barrier,
                                 trust=self.cfg.checkpoint.trust)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Goes into DeepSpeed's client_state (rank 0's copy is the one kept)."""
        s = self.cfg.sleep
        return {"megasleep": {
            "step": self.step, "tokens_seen": self.tokens_seen, "world_size": self.world,
            "steps": self.cfg.train.steps,
            "sleep_sampler": {"random_passes": s.random_passes, "random_seed": s.random_seed, "passes": s.passes,
                              "next_step": self.step},
            "model_cfg": self.cfg.model.model_dump(mode="json"),
            "tokenizer": self.tokenizer.info() if self.tokenizer is not None else None,
        }}

    def rank_state(self) -> dict[str, Any]:
        return {"data": self.train_data.state_dict(), "rng": rng_state(), "step": self.step}

    def load_state_dict(self, client: dict, rank_state: dict) -> None:
        st = client.get("megasleep")
        if st is None:
            raise CheckpointError("checkpoint has no megasleep client state (not written by this trainer?)")
        if st["model_cfg"] != self.cfg.model.model_dump(mode="json"):
            raise CheckpointError("the checkpoint's model config differs from this experiment's model; "
                                  "resume with the same model, or set checkpoint.resume=never")
        tok = st.get("tokenizer")
        if tok and self.tokenizer is not None and tok.get("hash") != self.tokenizer.hash:
            raise CheckpointError(f"the checkpoint was trained with tokenizer {tok.get('hash')} and this run "
                                  f"uses {self.tokenizer.hash} ({self.tokenizer.path})")
        check_steps_on_resume(self.cfg, st.get("steps"), self.rank == 0)
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
        client, rank_state = self.ckpt.load(self.engine, ckpt_dir, tag, data_source=self.cfg.data.source,
                                            model_cfg=self.cfg.model_cfg.model_dump(mode="json"))
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

    def discard_diverged_checkpoint(self, weights_step: int) -> None:
        """The weights after update ``weights_step`` diverged: never leave them as the last good save."""
        if self.rank == 0 and self.last_saved_step == weights_step:
            unmark_checkpoint(self.ckpt_dir, weights_step)
        self.barrier()

    # ------------------------------------------------------------------ steps
    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def forward_backward(self, batch: dict, loss_scale: torch.Tensor) -> SleepOutput:
        ids = batch["input_ids"].to(self.device, non_blocking=True)
        mask = batch["loss_mask"].to(self.device, non_blocking=True)
        docs = batch["doc_ids"].to(self.device, non_blocking=True)
        out = self.engine(ids, mask, docs, self.cfg.sleep, self.step)
        self.backward(out.loss_sum * loss_scale)
        return out

    def optimizer_step(self) -> tuple[bool, torch.Tensor | float]:
        """Set the lr for this step and step (DeepSpeed applies it at the accumulation boundary).
        Returns (applied, global grad norm) - the norm may stay a device tensor (read once, when logged)."""
        from megasleep.train.optim import lr_multiplier, set_lr

        mult = lr_multiplier(self.step, self.cfg.train.steps, self.cfg.optim)
        set_lr(self.optimizer, mult)
        own_norm = None
        if self.zero_stage == 0:  # DeepSpeed does not report the norm without ZeRO
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            own_norm = torch.nn.utils.get_total_norm(grads) if grads else 0.0
        self.engine.step()
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        return applied, (float("nan") if norm is None else norm)

    def global_target_tokens(self, batches: list[dict]) -> torch.Tensor:
        """Target tokens of the whole global batch (a device tensor: no host sync)."""
        local = sum(b["loss_mask"][:, 1:].sum() for b in batches)  # the batches are still on the host
        tok = torch.as_tensor(local, dtype=torch.float64).to(self.device).reshape(1)
        if self.world > 1:
            dist.all_reduce(tok)
        return tok

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. Per micro-batch nothing is read back to the host: loss and per-window
        sums accumulate on the device and cross to the host once, in the step's one all-reduce."""
        t0 = time.perf_counter()
        batches = self.train_data.batches(self.step)
        t_data = time.perf_counter() - t0
        tokens = self.global_target_tokens(batches)
        scale = (self.accum * self.world / tokens.clamp_min(1)).float()[0]
        self.module.time_sleep = (self.step + 1) % self.cfg.train.log_every == 0
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        win_sum = torch.zeros(0, dtype=torch.float64, device=self.device)
        win_tok: list[int] = []
        fwd_s = sleep_s = flops = 0.0
        n_tokens = input_tokens = 0
        for i, b in enumerate(batches):
            out = self.forward_backward(b, scale)
            loss_sum += out.loss_sum.detach()
            n_tokens += out.n_tokens
            B, T = b["input_ids"].shape
            input_tokens += B * T
            fwd_s += out.extras.get("forward_seconds", 0.0)
            sleep_s += out.extras.get("sleep_seconds", 0.0)
            flops += 3.0 * self.flops.forward_flops(B, T, self.cfg.sleep.window, self.cfg.sleep.eviction,
                                                     out.passes_used, out.window_tokens)
            win_sum = _add_padded(win_sum, out.window_loss_sum.double())
            win_tok = [a + b for a, b in zip(*_pad_lists(win_tok, out.window_tokens))]
            if i < len(batches) - 1:
                self.engine.step()  # DeepSpeed wants step() after every backward; no-op inside accumulation
        applied, gnorm = self.optimizer_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        host = torch.tensor([n_tokens, input_tokens, flops, t_data, fwd_s, sleep_s, float(self.stop.wants_stop()),
                             float(self.stop.budget_spent())], dtype=torch.float64)
        # the grad norm is already global (the same on every rank): last, outside the summed part
        vec = torch.cat([loss_sum.reshape(1), host.to(self.device),
                         torch.as_tensor(gnorm, dtype=torch.float64).reshape(1).to(self.device)])
        if self.world > 1:
            dist.all_reduce(vec[:-1])
        loss_sum_g, n_g, in_g, flops_g, data_g, fwd_g, sleep_g, stop_g, budget_g, gnorm = vec.tolist()
        windows = {w: [s, t] for w, (s, t) in enumerate(zip(win_sum.tolist(), win_tok)) if t}
        return {"loss": loss_sum_g / max(n_g, 1), "applied": applied, "grad_norm": gnorm,
                "lr": self.optimizer.param_groups[0]["lr"],
                "target_tokens": int(n_g), "input_tokens": int(in_g), "step_seconds": dt, "flops": flops_g,
                "data_share": data_g / self.world / dt, "sleep_share": sleep_g / fwd_g if fwd_g else 0.0,
                "passes": self.cfg.sleep.passes_for_step(self.step), "stop": stop_g > 0, "windows": windows,
                "budget_spent": budget_g > 0,
                "lrs": [g["lr"] for g in self.optimizer.param_groups]}

    def log(self, rec: dict[str, Any], window_acc: dict[int, list[float]]) -> None:
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, window_acc)
            window_acc = merge_window_sums(gathered)
        self.metrics.log(self.step, step_metrics(rec, window_acc, world=self.world, peak_flops=self.peak_flops,
                                                 peak_mem_gb=peak_memory_gb(self.device),
                                                 tokens_seen=self.tokens_seen, skipped=self.skipped))

    def evaluate(self) -> list[dict]:
        if not self.validator:
            return []
        self.engine.eval()
        try:
            return self.validator.validate(self.step, self.metrics, self.run_dir if self.rank == 0 else None)
        finally:
            self.engine.train()

    def export(self) -> Path | None:
        from megasleep.checkpoint.deepspeed import consolidated_from_zero, export_state_dict

        out = self.run_dir / "export"
        if self.zero_stage == 3 or self.precision == "bf16":  # the fp32 master weights, not the bf16 copies
            if self.last_saved_step != self.step:
                self.save()
            state = consolidated_from_zero(self.ckpt_dir, None) if self.rank == 0 else None
        else:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()} if self.rank == 0 else None
        if self.rank == 0:
            tok = self.tokenizer.path if self.tokenizer is not None else None
            export_state_dict(state, self.cfg.model, out, tok, sleep=self.cfg.sleep.model_dump(mode="json"),
                              source={"kind": "megasleep-train", "run_dir": str(self.run_dir.resolve()),
                                      "step": self.step, "experiment": self.cfg.name,
                                      "data": data_record(self.cfg.resolved())})
            self.metrics.write(f"[megasleep] exported {out}")
        self.barrier()
        return out

    def describe(self) -> None:
        c = self.cfg
        n = self.model.num_parameters() if self.zero_stage < 3 else self.flops.params
        msg = (f"[megasleep] {c.name}: {c.model.name} {n / 1e6:.2f}M params, pattern {c.model.pattern}, "
               f"L={c.sleep.window} N={c.sleep.random_passes or c.sleep.passes} {c.sleep.eviction}; "
               f"{self.world} rank(s) on {self.device.type} ({self.precision}), ZeRO-{self.zero_stage}, "
               f"batch {c.train.global_batch_size} = {c.train.micro_batch_size} x {self.accum} accum x {self.world}; "
               f"optim {c.optim.name}; run dir {self.run_dir}"
               + (f"; resumed from {self.resumed_from} at step {self.step}" if self.resumed_from else ""))
        self.metrics.write(msg)

    # ------------------------------------------------------------------ loop
    def train(self) -> str:
        cfg = self.cfg
        total = cfg.train.steps
        if self.step >= total:
            self.metrics.write(f"[megasleep] already at step {self.step} of {total}: nothing to train")
            self.finish()
            return "done"
        window_acc: dict[int, list[float]] = {}
        while self.step < total:
            rec = self.train_step()
            self.check_health(rec)
            self.tokens_seen += rec["input_tokens"]
            self.history.append({"step": self.step, "loss": rec["loss"], "applied": rec["applied"]})
            window_acc = merge_window_sums([window_acc, rec["windows"]])
            self.step += 1
            self.status.step = self.step
            self.metrics.advance()
            if self.bad_in_row >= cfg.train.max_bad_steps:
                why = f"{self.bad_in_row} non-finite steps in a row (steps {self.step - self.bad_in_row}..{self.step - 1})"
                if self.nonfinite_loss_in_row == self.bad_in_row:
                    # the same weights gave a non-finite loss on every batch: it is the weights
                    self.discard_diverged_checkpoint(self.step - self.bad_in_row)
                    why += "; the loss itself was not finite: the weights diverged (lower optim.lr?)"
                self.fail(why)
            if self.step % cfg.train.log_every == 0 or self.step == total:
                self.log(rec, window_acc)
                window_acc = {}
            if rec["stop"]:
                return self.stopped(self.stop.reason or "stop requested by another rank")
            if rec["budget_spent"] and self.step < total:
                self.metrics.write(f"[megasleep] time budget of {cfg.train.time_budget_minutes} min spent at step "
                                   f"{self.step} of {total}: ending training here")
                self.ended_early = True
                break
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < total \
                    and self.bad_in_row == 0:
                self.save()
            if self.validator.should_validate(self.step) and self.step < total:
                self.evaluate()
        self.finish()
        return "done"

    def check_health(self, rec: dict[str, Any]) -> None:
        """A skipped (non-finite) step counts towards train.max_bad_steps; a finite loss above
        train.divergence_factor x the best loss so far means the weights of the previous update
        exploded: stop at once, and never leave those weights as the last good checkpoint."""
        if not rec["applied"]:
            self.bad_in_row += 1
            self.skipped += 1
            self.nonfinite_loss_in_row = 0 if math.isfinite(rec["loss"]) else self.nonfinite_loss_in_row + 1
            self.metrics.log(self.step + 1, {"loss": rec["loss"], "grad_norm": rec["grad_norm"],
                                             "bad_in_row": self.bad_in_row}, kind="skipped")
            return
        self.bad_in_row = self.nonfinite_loss_in_row = 0
        loss, factor = rec["loss"], self.cfg.train.divergence_factor
        if factor is not None and math.isfinite(self.best_loss) and loss > factor * self.best_loss:
            self.discard_diverged_checkpoint(self.step)
            self.fail(f"loss diverged at step {self.step + 1}: {loss:.4g} > train.divergence_factor={factor} x the "
                      f"best loss so far ({self.best_loss:.4g}); lower optim.lr or raise optim.warmup_steps")
        self.best_loss = min(self.best_loss, loss)

    def fail(self, why: str) -> None:
        latest = self.ckpt_dir / LATEST
        where = (f"last good checkpoint: {self.ckpt_dir / latest.read_text().strip()}" if latest.exists()
                 else "no good checkpoint yet")
        self.status.write("failed", reason=why)
        raise TrainingFailed(f"{why}; stopping ({where})")

    def stopped(self, reason: str) -> str:
        if self.last_saved_step != self.step:
            self.save()  # skipped (non-finite) steps left the weights untouched: still a good state
        state = "time_limit" if reason == "time_limit" else "preempted"
        self.metrics.write(f"[megasleep] stopped at step {self.step} ({reason}); checkpoint saved, "
                           "resume by running the same command again")
        self.status.write(state, reason=reason)
        return state

    def finish(self) -> None:
        if self.last_saved_step != self.step:
            self.save()
        if self.cfg.eval.at_end and self.validator:
            res = self.evaluate()
            if self.rank == 0:
                (self.run_dir / "eval.json").write_text(json.dumps({"step": self.step, "results": res}, indent=1))
        if self.cfg.checkpoint.export:
            self.export()
        self.status.write("done", loss=self.history[-1]["loss"] if self.history else None,
                          seconds=round(time.time() - self.t_start, 1), ended_early=self.ended_early)

    def close(self) -> None:
        """End of the process group on every rank: barrier, then destroy (megasleep.train.distributed)."""
        with contextlib.suppress(Exception):
            self.metrics.close()
        with contextlib.suppress(Exception):
            self.train_data.close()
        shutdown_distributed()


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b for 1-D tensors of possibly different lengths (micro-batches can have different numbers of
    windows), zeros where one is shorter."""
    if len(a) < len(b):
        a, b = b, a
    return torch.cat([a[:len(b)] + b, a[len(b):]])


def _pad_lists(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    n = max(len(a), len(b))
    return a + [0] * (n - len(a)), b + [0] * (n - len(b))
