"""The experiment config: one YAML (``configs/experiments/*.yaml``) plus dotted overrides.

Sections (every one validated, unknown keys rejected, errors name the file and the dotted key)::

    name, run_dir, seed
    model       path to configs/models/*.yaml, or an inline mapping (``base: path`` + changed keys)
    sleep       megasleep.sleep.SleepConfig (window L, passes N, eviction, random N, truncation, ...)
    data        where batches come from (on-the-fly task generation or WebDataset shards)
    optim       AdamW or Muon(hidden matrices)+AdamW, schedule, clipping
    train       steps, batch sizes, precision, device, guards
    checkpoint  every, keep_last, resume, export
    deepspeed   ZeRO JSON (configs/deepspeed/zero*.json) and overrides
    logging     console / JSONL / TensorBoard / W&B
    eval        periodic evaluation at several N

``load_experiment(path, overrides)`` returns an :class:`ExperimentConfig` whose ``model`` has been
resolved into a validated :class:`~megasleep.models.ModelConfig` (``cfg.model_cfg``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, PrivateAttr, model_validator

from megasleep.config import ConfigError, StrictModel, apply_overrides, read_yaml, validate
from megasleep.models.config import ModelConfig
from megasleep.sleep.config import SleepConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
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


class DataConfig(StrictModel):
    source: Literal["task", "shards"] = "task"
    task: TaskDataConfig = TaskDataConfig()
    tokenizer: str | None = Field(
        None, description="sentencepiece model; None: the task's own tokenizer (built in run_dir) or the "
                          "shards' manifest tokenizer")
    train: str | list[str] | None = Field(None, description="shards: train dataset dir / pattern(s)")
    val: str | list[str] | None = Field(None, description="shards: validation dataset dir / pattern(s)")
    loader: dict[str, Any] = Field(default_factory=dict,
                                   description="extra megasleep.data.loader.LoaderConfig settings")

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


class FaultConfig(StrictModel):
    """Fault injection for tests (all off by default)."""

    nan_loss_steps: list[int] = Field(default_factory=list,
                                      description="make the loss NaN at these steps (1-based, as logged)")
    pause_in_save_steps: list[int] = Field(default_factory=list, description="when saving at these steps, "
                                           "sleep after the files are written and before marking them complete")
    pause_in_save_seconds: float = Field(60.0, ge=0)
    step_sleep: float = Field(0.0, ge=0, description="seconds to sleep after every step (slows a run down)")


class TrainConfig(StrictModel):
    steps: int = Field(ge=1)
    global_batch_size: int = Field(ge=1, description="sequences per optimizer step, all ranks together")
    micro_batch_size: int = Field(ge=1, description="sequences per rank per forward/backward")
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA (fp32 master weights, SSM params fp32), fp32 on CPU")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = Field(10, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="stop after this many non-finite steps in a row")
    time_limit_minutes: float | None = Field(None, gt=0, description="save and stop (resumable) after this "
                                                                    "wall time, like a preemption")
    time_budget_minutes: float | None = Field(None, gt=0, description="end training after this wall time as "
                                                                      "if train.steps were reached (eval, export)")
    fault: FaultConfig = FaultConfig()


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


class DeepSpeedConfig(StrictModel):
    config: str = Field("configs/deepspeed/zero1.json", description="DeepSpeed JSON (ZeRO stage etc.)")
    zero_stage: int | None = Field(None, ge=0, le=3, description="override the JSON's ZeRO stage")
    zero_init: bool = Field(False, description="ZeRO-3: build the model partitioned (deepspeed.zero.Init)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="merged into the JSON")
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
    passes: list[int] = Field(default_factory=lambda: [1, 2, 4], description="sleep depths N to evaluate")
    samples: int = Field(256, ge=1, description="evaluation sequences (all ranks together)")
    batch_size: int | None = Field(None, ge=1, description="default: train.micro_batch_size")
    at_end: bool = True

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if not self.passes or any(n < 1 for n in self.passes):
            raise ValueError(f"passes={self.passes}: need a non-empty list of N >= 1")
        return self


class ExperimentConfig(StrictModel):
    name: str = "experiment"
    description: str = ""
    run_dir: str = Field("runs/{name}", description="outputs; '{name}' is replaced by the name")
    model: dict[str, Any]
    sleep: SleepConfig
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    logging: LoggingConfig = LoggingConfig()
    eval: EvalConfig = EvalConfig()

    _model_cfg: ModelConfig | None = PrivateAttr(None)
    _source: str = PrivateAttr("<config>")

    @property
    def model_cfg(self) -> ModelConfig:
        assert self._model_cfg is not None, "use load_experiment() to build an ExperimentConfig"
        return self._model_cfg

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
        """The config with the model inlined (what goes into run_dir/config.yaml and checkpoints)."""
        data = self.model_dump(mode="json")
        data["model"] = self.model_cfg.model_dump(mode="json")
        return data


def resolve_path(path: str | Path, relative_to: Path | None = None) -> Path:
    """A config-referenced file: as given (absolute or from the cwd), else next to the referencing
    file, else from the repository root (so `configs/...` works from any directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for base in (relative_to, REPO_ROOT):
        if base is not None and (base / p).exists():
            return base / p
    return p


def _resolve_model(model: dict[str, Any], source: str, cfg_dir: Path | None) -> ModelConfig:
    data = copy.deepcopy(model)
    base = data.pop("base", None)
    merged: dict[str, Any] = {}
    where = source
    if base is not None:
        path = resolve_path(base, cfg_dir)
        if not path.is_file():
            raise ConfigError(f"{source}: model.base: model config file not found: {base}")
        raw = read_yaml(path)
        merged = raw["model"] if isinstance(raw.get("model"), dict) else raw
        where = f"{source} (model.base {path})"
    _deep_update(merged, data)
    return validate(ModelConfig, merged, where, prefix="model")


def _deep_update(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def load_experiment(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read an experiment YAML (default: the tiny demo), apply ``key=value`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_EXPERIMENT
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected an experiment YAML file")
    data = read_yaml(path)
    source = str(path)
    # `model: configs/models/tiny.yaml` is shorthand for `model: {base: configs/models/tiny.yaml}`
    if isinstance(data.get("model"), str):
        data["model"] = {"base": data["model"]}
    overrides = list(overrides)
    for o in overrides:  # `model=configs/models/x.yaml` swaps the model file
        if o.startswith("model=") and "." not in o.split("=", 1)[0]:
            data["model"] = {"base": o.split("=", 1)[1]}
    rest = [o for o in overrides if not o.startswith("model=")]
    if rest:
        apply_overrides(data, rest)
        source += " (with overrides " + " ".join(overrides) + ")"
    if "model" in data and not isinstance(data["model"], dict):
        raise ConfigError(f"{source}: model: expected a path to a model YAML or a mapping, "
                          f"got {type(data['model']).__name__}")
    cfg = validate(ExperimentConfig, data, source)
    cfg._source = source
    cfg._model_cfg = _resolve_model(cfg.model, source, path.parent)
    _check_consistency(cfg, source)
    return cfg


def _check_consistency(cfg: ExperimentConfig, source: str) -> None:
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"{source}: train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if cfg.sleep.random_passes is None and cfg.sleep.passes < 1:
        raise ConfigError(f"{source}: sleep.passes must be >= 1")


def experiment_from_dict(data: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    """Rebuild a config saved by :meth:`ExperimentConfig.resolved` (model inline)."""
    cfg = validate(ExperimentConfig, data, source)
    cfg._source = source
    cfg._model_cfg = _resolve_model(cfg.model, source, None)
    return cfg


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.resolved(), sort_keys=False)
