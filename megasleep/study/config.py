"""A study (``configs/studies/*.yaml``): one base experiment trained once per (sleep depth N, seed).

Every run of a study is the real trainer (``megasleep train``) on the base experiment plus the study's
shared overrides plus its own ``sleep.passes`` and seed. The seed sets both ``train.seed`` (init, and
the random-N draw) and ``data.task.seed`` (the sample stream), so for one seed every N sees exactly the
same tokens in the same order: the runs differ only in how deeply they sleep.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from megasleep.config import ConfigError, StrictModel, load_config
from megasleep.train.config import REPO_ROOT, ExperimentConfig, load_experiment


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
    """One training run of a study."""

    label: str  # "N=2" or "N~U[1,4]"
    passes: int  # the N it trains at; for the random-N model the largest N it draws
    random_n: bool = False  # N ~ U[lo, hi] per step (random_passes) instead of a fixed N
    seed: int
    overrides: list[str]

    @property
    def dirname(self) -> str:
        return ("Nrand" if self.random_n else f"N{self.passes}") + f"-seed{self.seed}"


def load_study(path: str | Path, overrides: list[str] = ()) -> StudyConfig:
    return load_config(StudyConfig, path, overrides)


def plan(cfg: StudyConfig) -> list[RunSpec]:
    """Every run of the study, in the order they are trained (all N of seed 0 first)."""
    evals = [f"eval.passes=[{','.join(map(str, cfg.eval_passes))}]", f"eval.samples={cfg.eval_samples}"]
    runs = []
    for seed in cfg.seeds:
        for n in cfg.train_passes:
            runs.append(RunSpec(label=f"N={n}", passes=n, seed=seed, overrides=[
                *cfg.overrides, f"sleep.passes={n}", f"train.seed={seed}", f"data.task.seed={seed}", *evals]))
    if cfg.random_passes is not None:
        lo, hi = cfg.random_passes
        for seed in cfg.random_seeds if cfg.random_seeds is not None else cfg.seeds[:1]:
            runs.append(RunSpec(label=f"N~U[{lo},{hi}]", passes=hi, random_n=True, seed=seed, overrides=[
                *cfg.overrides, f"sleep.passes={hi}", f"sleep.random_passes=[{lo},{hi}]",
                f"sleep.random_seed={seed}", f"train.seed={seed}", f"data.task.seed={seed}", *evals]))
    return runs


def check_runs(cfg: StudyConfig, runs: list[RunSpec], source: str) -> list[ExperimentConfig]:
    """Load every run's experiment config before anything trains, so a typo fails in seconds."""
    experiment = REPO_ROOT / cfg.experiment
    if not experiment.is_file():
        raise ConfigError(f"{source}: experiment: {cfg.experiment} does not exist")
    loaded = []
    for spec in runs:
        try:
            loaded.append(load_experiment(experiment, [*spec.overrides, "run_dir=/tmp/megasleep-study-check"]))
        except ConfigError as exc:
            raise ConfigError(f"{source}: run {spec.dirname}: {exc}") from None
    return loaded
