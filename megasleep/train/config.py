"""The experiment config: one YAML (``configs/experiments/*.yaml``) plus dotted overrides.

Contract: :func:`load_experiment` returns a validated :class:`ExperimentConfig` (every section typed,
``model`` a :class:`~megasleep.models.ModelConfig`) or raises one ConfigError naming the file and
the dotted key. Sections and their keys: docs/training.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, create_model, field_validator, model_validator

from megasleep.config import (  # noqa: F401  (resolve_path: imported from here by callers)
    REPO_ROOT,
    ConfigError,
    StrictModel,
    apply_overrides,
    read_config_file,
    resolve_path,
    validate,
)
from megasleep.models.config import ModelConfig, model_section
from megasleep.sleep.config import SleepConfig

DEFAULT_EXPERIMENT = REPO_ROOT / "configs" / "experiments" / "tiny-demo.yaml"

Difficulty = int | str | list[int]


class TaskDataConfig(StrictModel):
    """On-the-fly samples from a task generator (megasleep.data.tasks): deterministic by global sample
    index, so the stream's state is just the step number."""

    name: str = Field("rule110", description="task generator name (megasleep.data.tasks)")
    params: dict[str, Any] = Field(default_factory=dict, description="generator parameters")
    difficulty: Difficulty = Field("1", description="training difficulties, e.g. 32, '1-16', [1,2,4]")
    eval_difficulty: Difficulty | None = Field(None, description="eval difficulties (default: difficulty)")
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _known_task(cls, name: str) -> str:
        from megasleep.data.tasks import TASKS

        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
        return name

    @field_validator("difficulty", "eval_difficulty")
    @classmethod
    def _parses(cls, spec: Difficulty | None) -> Difficulty | None:
        from megasleep.data.tasks import parse_difficulty

        if spec is not None:
            try:
                parse_difficulty(spec)
            except ValueError:
                raise ValueError(f"{spec!r} is not a difficulty: use an integer, a range '1-16', a list "
                                 "'1,2,4' or [1, 2, 4]") from None
        return spec

    @model_validator(mode="after")
    def _known_params(self) -> TaskDataConfig:
        from megasleep.data.tasks import get_task

        unknown = sorted(set(self.params) - set(get_task(self.name).defaults))
        if unknown:
            raise ValueError(f"params: {unknown} are not parameters of task {self.name!r} "
                             f"(it has {sorted(get_task(self.name).defaults)})")
        return self


def _loader_settings() -> type[StrictModel]:
    """``data.loader``: the megasleep.data.loader.LoaderConfig fields a user sets (the trainer fills the
    datasets, batch size, seed and tokenizer hash), with the same types, defaults and bounds."""
    from megasleep.data.loader import LoaderConfig

    filled = {"datasets", "batch_size", "seed", "tokenizer_hash"}
    fields = {n: (f.annotation, f) for n, f in LoaderConfig.model_fields.items() if n not in filled}
    return create_model("LoaderSettings", __base__=StrictModel, **fields)


LoaderSettings = _loader_settings()


class DataConfig(StrictModel):
    source: Literal["task", "shards"] = "task"
    task: TaskDataConfig = TaskDataConfig()
    tokenizer: str | None = Field(
        None, description="sentencepiece model; None: the task's own tokenizer (built in run_dir) or the "
                          "shards' manifest tokenizer")
    train: str | list[str] | None = Field(None, description="shards: train dataset dir / pattern(s)")
    val: str | list[str] | None = Field(None, description="shards: validation dataset dir / pattern(s)")
    loader: LoaderSettings = Field(default_factory=LoaderSettings,
                                   description="megasleep.data.loader.LoaderConfig settings (shards)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "shards" and not self.train:
            raise ValueError("source 'shards' needs data.train (a dataset directory or shard pattern)")
        return self


class OptimConfig(StrictModel):
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (with muon: for the non-matrix params)")
    muon_lr: float = Field(2e-3, gt=0, description="Muon learning rate for hidden weight matrices")
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float | None = Field(None, ge=0, description="default: weight_decay")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm (0 = off)")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr (cosine, wsd)")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of the steps spent decaying")
    trainable: list[str] | None = Field(None, description="train only parameters whose name matches one of "
                                                          "these globs (e.g. 'layers.3.mixer.*'); None = all")


class TrainConfig(StrictModel):
    steps: int = Field(ge=1)
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(ge=1, description="sequences per rank per forward/backward")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16-autocast", "bf16"] = Field(
        "auto", description="bf16: bf16 weights (ZeRO-1/2: A_log, dt_bias, D stay fp32; ZeRO-3: all bf16) with fp32 "
                            "master weights and gradient accumulation in DeepSpeed's optimizer; bf16-autocast: "
                            "autocast over fp32 weights; auto: bf16-autocast on CUDA, fp32 on CPU "
                            "(docs/performance.md)")
    compile: bool = Field(False, description="torch.compile each block (same results; compiles once per shape)")
    compile_backend: str = Field("inductor", description="torch.compile backend for train.compile ('eager' only "
                                                         "captures graphs: a quick check on CPU)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    time_limit_minutes: float | None = Field(None, gt=0, description="save and stop (resumable) after this "
                                                                    "wall time, like a preemption")
    time_budget_minutes: float | None = Field(None, gt=0, description="end training after this wall time as "
                                                                      "if train.steps were reached (eval, export)")
    divergence_factor: float | None = Field(10.0, gt=1, description="stop (failed) when a step's loss exceeds "
                                            "this x the best loss so far; None = off")

    @field_validator("compile_backend")
    @classmethod
    def _known_backend(cls, name: str) -> str:
        from torch._dynamo import list_backends

        known = list_backends(exclude_tags=())
        if name not in known:
            raise ValueError(f"{name!r} is not a torch.compile backend; valid: {', '.join(known)}")
        return name


class CheckpointConfig(StrictModel):
    dir: str | None = Field(None, description="default: <run_dir>/checkpoints")
    every: int = Field(0, ge=0, description="save every K steps (0: only at the end and when stopped)")
    keep_last: int = Field(2, ge=1)
    resume: str = Field("auto", description="'auto' (latest in dir, if any), 'never', or a checkpoint dir "
                                            "(…/checkpoints or …/checkpoints/step_…)")
    export: bool = Field(True, description="write an HF-style directory (<run_dir>/export) at the end")
    init_from: str | None = Field(None, description="start from the weights of an exported model directory "
                                                    "(config.json + model.safetensors); tensors the model has "
                                                    "and the directory lacks keep their fresh init (reported)")
    allow_steps_change: bool = Field(False, description="resume with another train.steps: re-plan the lr "
                                                        "schedule over the new length (else refused)")
    trust: bool = Field(False, description="unpickle checkpoint files without the weights-only check "
                                           "(only for checkpoints whose author you trust)")


class DeepSpeedConfig(StrictModel):
    config: str = Field("configs/deepspeed/zero1.json", description="DeepSpeed JSON (ZeRO stage etc.)")
    zero_stage: int | None = Field(None, ge=0, le=3, description="override the JSON's ZeRO stage")
    zero_init: bool = Field(False, description="ZeRO-3: build the model partitioned (deepspeed.zero.Init)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the JSON")
    zero3_keep_gathered: bool = Field(True, description="ZeRO-3: keep each gathered weight until the micro-batch's "
                                      "backward is done (stage3_max_live_parameters / stage3_max_reuse_distance "
                                      "raised to the model's size): one all-gather per weight per micro-batch "
                                      "whatever N, for a full 16-bit copy of the weights per GPU; false: the "
                                      "JSON's limits (a regather per (window, pass); docs/performance.md)")
    shm_comm: bool = Field(False, description="CPU only: DeepSpeed's shared-memory all-reduce op "
                                              "(JIT-compiled on first use, ~40 s); off = plain gloo")


class WandbConfig(StrictModel):
    enabled: bool = False
    project: str = "megasleep"
    entity: str | None = None
    mode: Literal["offline", "online", "disabled"] = "offline"
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(StrictModel):
    progress: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    wandb: WandbConfig = WandbConfig()
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak for MFU (default: a table "
                                                              "for known GPUs, a measured GEMM on CPU)")


class EvalConfig(StrictModel):
    every: int = Field(0, ge=0, description="evaluate every K steps (0: only at the end)")
    eval_passes: list[int] = Field(default_factory=lambda: [1, 2, 4], description="sleep depths N to evaluate at")
    samples: int = Field(256, ge=1, description="evaluation sequences (all ranks together)")
    batch_size: int | None = Field(None, ge=1, description="default: train.micro_batch_size")
    at_end: bool = True
    diagnostics: bool = Field(True, description="also measure the collapse diagnostics of every N evaluated "
                                                "(key share, residual RMS, memory worth; docs/sleep.md)")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "passes" in data:  # an int N is `passes`; a list of N has its own name
            raise ValueError("passes: renamed eval_passes (the list of N to evaluate at)")
        return data

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.eval_passes or any(n < 1 for n in self.eval_passes):
            raise ValueError(f"eval_passes={self.eval_passes}: need a non-empty list of N >= 1")
        return self


class ExperimentConfig(StrictModel):
    name: str = "experiment"
    description: str = ""
    run_dir: str = Field("runs/{name}", description="outputs; '{name}' is replaced by the name")
    model: ModelConfig = Field(description="in a YAML: a model file path, or a mapping (``base: path`` + changed "
                                           "keys, or every key inline)")
    sleep: SleepConfig
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    _source: str = PrivateAttr("<config>")

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        t = self.train
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                             f"train.micro_batch_size={t.micro_batch_size}")
        if self.optim.warmup_steps >= t.steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} is not shorter than the run "
                             f"(train.steps={t.steps}): the lr would never reach its peak")
        return self

    @property
    def model_cfg(self) -> ModelConfig:
        """The same as ``model`` (the name older code uses)."""
        return self.model

    @property
    def source(self) -> str:
        return self._source

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir.replace("{name}", self.name))

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_path / "checkpoints"

    def resolved(self) -> dict[str, Any]:
        """The config as plain data, model inlined (what goes into run_dir/config.yaml and checkpoints)."""
        return self.model_dump(mode="json")


def load_experiment(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML (default: the tiny demo), apply ``key=value`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_EXPERIMENT
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected an experiment YAML file")
    data = read_config_file(path)
    source = str(path)
    overrides = list(overrides)
    for o in overrides:  # `model=configs/models/x.yaml` swaps the model file
        if o.startswith("model=") and "." not in o.split("=", 1)[0]:
            data["model"] = o.split("=", 1)[1]
    if "model" in data:
        data["model"] = model_section(data["model"], source, path.parent)
    rest = [o for o in overrides if not o.startswith("model=")]
    if overrides:
        source += " (with overrides " + " ".join(overrides) + ")"
    if rest:
        apply_overrides(data, rest)
    return experiment_from_dict(data, source)


def experiment_from_dict(data: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Validate a config given as data (e.g. one saved by :meth:`ExperimentConfig.resolved`)."""
    cfg = validate(ExperimentConfig, data, source)
    cfg._source = source
    return cfg


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.resolved(), sort_keys=False)
