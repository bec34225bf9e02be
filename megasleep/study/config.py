"""A study (``configs/studies/*.yaml``): one base experiment trained once per (sleep depth N, seed).

Every run of a study is the real trainer (``megasleep train``) on its own typed experiment config: the
base experiment with the study's shared overrides (dotted strings, the YAML/CLI format, validated
once), then the run's own edits of typed values (``sleep.passes``, the seeds, the evaluation),
re-validated as a whole; the run trains from that config written to ``run_dir/config.yaml``. The seed
sets both ``train.seed`` (init, and the random-N draw) and ``data.task.seed`` (the sample stream), so
for one seed every N sees exactly the same tokens in the same order: the runs differ only in how
deeply they sleep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, Field, model_validator

from megasleep.config import ConfigError, StrictModel, load_config
from megasleep.train.config import REPO_ROOT, ExperimentConfig, experiment_from_dict, load_experiment

M = TypeVar("M", bound=BaseModel)


class StudyConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    experiment: str = Field(description="base experiment YAML (relative to the repository root)")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides shared by every run")
    train_passes: list[int] = Field(description="sleep depths N to train, one model per (N, seed)")
    seeds: list[int] = Field(min_length=1, description="seeds; each trains every N on identical data")
    random_passes: tuple[int, int] | None = Field(
        None, description="also train a random-N model (N ~ U[lo, hi] per step) per seed in random_seeds")
    random_seeds: list[int] | None = Field(None, description="default: the first seed only")
    eval_passes: list[int] = Field(description="every model is evaluated at each of these N")
    eval_samples: int = Field(1024, ge=1, description="validation samples per (model, N)")
    chance: float = Field(ge=0, le=1, description="accuracy of guessing (drawn as a line, used in the verdict)")
    difficulty_name: str = Field("difficulty", description="what the task's difficulty is called (t, k, ops)")
    threads: int = Field(1, ge=1, description="OMP threads per training run")
    diagnostics: bool = Field(False, description="also measure every run's collapse diagnostics at every eval "
                                                 "N (megasleep.study.diagnose; needs checkpoint.export=true)")
    out: str = Field("runs/studies/{name}", description="run directories (checkpoints, logs)")
    results: str = Field("docs/results/{name}", description="tables, plots and summary.json")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "passes" in data:  # lists of N have their own names; N is an int
            raise ValueError("passes: renamed train_passes (the list of N to train; eval_passes is the list "
                             "of N to evaluate at)")
        return data

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        for key in ("train_passes", "eval_passes"):
            values = getattr(self, key)
            if not values or any(n < 1 for n in values) or len(set(values)) != len(values):
                raise ValueError(f"{key}={values}: need distinct N >= 1")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: repeated seed")
        if self.random_passes is not None and not 1 <= self.random_passes[0] <= self.random_passes[1]:
            raise ValueError(f"random_passes={list(self.random_passes)}: need 1 <= lo <= hi")
        return self

    def path(self, key: str) -> Path:
        p = Path(getattr(self, key).replace("{name}", self.name))
        return p if p.is_absolute() else REPO_ROOT / p


class RunSpec(StrictModel):
    """One training run of a study: its typed experiment config and what identifies it in the tables."""

    label: str  # "N=2" or "N~U[1,4]"
    passes: int  # the N it trains at; for the random-N model the largest N it draws
    random_n: bool = False  # N ~ U[lo, hi] per step (random_passes) instead of a fixed N
    seed: int
    edits: dict[str, Any]  # what this run changes in the study's base experiment, by section
    config: ExperimentConfig  # the base experiment with ``edits`` applied, validated

    @property
    def dirname(self) -> str:
        return run_name(self.passes, self.random_n, self.seed)


def run_name(passes: int, random_n: bool, seed: int) -> str:
    """A run's directory name (and its name in the tables): ``N2-seed0``, ``Nrand-seed0``."""
    return ("Nrand" if random_n else f"N{passes}") + f"-seed{seed}"


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    return load_config(StudyConfig, path, overrides)


def load_base(cfg: StudyConfig, source: str = "<study>") -> ExperimentConfig:
    """The study's base experiment with its shared ``overrides`` (the dotted strings a user writes in the
    study YAML), validated once; a missing file or a bad override is one error naming the study."""
    experiment = REPO_ROOT / cfg.experiment
    if not experiment.is_file():
        raise ConfigError(f"{source}: experiment: {cfg.experiment} does not exist")
    try:
        return load_experiment(experiment, cfg.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def edit(model: M, changes: dict[str, Any]) -> M:
    """``model`` with ``changes`` applied: a nested mapping of field names whose mappings edit the
    sub-model of the same name (``{"data": {"task": {"seed": 1}}}``). Not validated: see :func:`plan`."""
    update = {}
    for key, value in changes.items():
        if key not in type(model).model_fields:
            raise ConfigError(f"{type(model).__name__} has no field {key!r}")
        current = getattr(model, key)
        update[key] = edit(current, value) if isinstance(value, dict) and isinstance(current, BaseModel) else value
    return model.model_copy(update=update)


def plan(cfg: StudyConfig, source: str = "<study>", base: ExperimentConfig | None = None) -> list[RunSpec]:
    """Every run of the study, in the order they are trained (all N of seed 0 first), each a typed edit
    of the base experiment re-validated as a whole, so a value one run makes impossible fails here,
    before anything trains, naming the run."""
    base = load_base(cfg, source) if base is None else base
    evals = {"eval_passes": list(cfg.eval_passes), "samples": cfg.eval_samples}

    def run(label: str, passes: int, seed: int, sleep: dict[str, Any], random_n: bool = False) -> RunSpec:
        edits = {"sleep": {"passes": passes, **sleep}, "train": {"seed": seed}, "data": {"task": {"seed": seed}},
                 "eval": evals}
        source_of_run = f"{source}: run {run_name(passes, random_n, seed)}"
        config = experiment_from_dict(edit(base, edits).resolved(), source_of_run)
        return RunSpec(label=label, passes=passes, random_n=random_n, seed=seed, edits=edits, config=config)

    runs = [run(f"N={n}", n, seed, {}) for seed in cfg.seeds for n in cfg.train_passes]
    if cfg.random_passes is not None:
        lo, hi = cfg.random_passes
        for seed in cfg.random_seeds if cfg.random_seeds is not None else cfg.seeds[:1]:
            runs.append(run(f"N~U[{lo},{hi}]", hi, seed, {"random_passes": (lo, hi), "random_seed": seed},
                            random_n=True))
    return runs
