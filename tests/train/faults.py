"""Fault injection for the trainer tests: a Trainer subclass, kept out of the production config.

Select it for a `megasleep train` subprocess with the environment of :func:`fault_env`:
``MEGASLEEP_TRAINER=tests.train.faults:FaultyTrainer`` and the faults as JSON in ``MEGASLEEP_FAULTS``
(validated by :class:`FaultConfig`, unknown keys are errors). Environment variables also travel
through sbatch / srun to every rank.
"""

from __future__ import annotations

import json
import os
import time

from pydantic import Field

from megasleep.config import StrictModel, validate
from megasleep.train.checkpoint import CheckpointManager
from megasleep.train.trainer import Trainer

FAULTS_ENV = "MEGASLEEP_FAULTS"


class FaultConfig(StrictModel):
    """What to break (all off by default)."""

    nan_loss_steps: list[int] = Field(default_factory=list,
                                      description="make the loss NaN at these steps (1-based, as logged)")
    pause_in_save_steps: list[int] = Field(default_factory=list, description="when saving at these steps, "
                                           "sleep after the files are written and before marking them complete")
    pause_in_save_seconds: float = Field(60.0, ge=0)
    step_sleep: float = Field(0.0, ge=0, description="seconds to sleep after every step (slows a run down)")
    raise_at_step: int | None = Field(None, description="raise RuntimeError in this step (1-based)")


def fault_env(**faults) -> dict[str, str]:
    """Environment entries that make `megasleep train` run the FaultyTrainer with these faults."""
    FaultConfig(**faults)  # a typo fails in the test, not in the subprocess
    return {"MEGASLEEP_TRAINER": "tests.train.faults:FaultyTrainer", FAULTS_ENV: json.dumps(faults)}


class FaultyTrainer(Trainer):
    def __init__(self, cfg, eval_only: bool = False):
        self.faults = validate(FaultConfig, json.loads(os.environ.get(FAULTS_ENV) or "{}"), FAULTS_ENV)
        super().__init__(cfg, eval_only)

    def build_checkpointer(self) -> CheckpointManager:
        return CheckpointManager(self.ckpt_dir, self.cfg.checkpoint.keep_last, self.rank, self.world, self.barrier,
                                 fault=self.faults)

    def backward(self, loss):
        if self.step + 1 in self.faults.nan_loss_steps:
            loss = loss * float("nan")
        if self.step + 1 == self.faults.raise_at_step:
            raise RuntimeError(f"injected fault at step {self.step + 1}")
        super().backward(loss)

    def optimizer_step(self):
        out = super().optimizer_step()
        if self.faults.step_sleep:
            time.sleep(self.faults.step_sleep)
        return out
