"""Every shipped experiment divides its global batch over the ranks it is meant to run on.

DeepSpeed needs global batch = micro batch x accumulation steps x ranks; the check is the trainer's
own (`build_ds_config`, what `megasleep train --check-only --world-size W` runs). A config whose documented
launch (`sbatch --nodes=K --gpus-per-node=G ...` in its header) uses 8 GPUs or more is a scale config:
it must divide at every typical world size, 8 to 128 ranks. Every config must divide at the world
size its own header documents.
"""

from __future__ import annotations

import re

import pytest

from megasleep.config import ConfigError
from megasleep.train.config import load_experiment
from megasleep.train.engine import build_ds_config
from tests.train.helpers import ROOT

EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))
SCALE_WORLDS = (8, 16, 32, 64, 128)


def divides(cfg, world: int) -> bool:
    try:
        conf = build_ds_config(cfg, world)
    except ConfigError as exc:
        assert "not divisible" in str(exc) and f"world size {world}" in str(exc), exc
        return False
    return conf["train_batch_size"] == conf["train_micro_batch_size_per_gpu"] * conf["gradient_accumulation_steps"] * world


def documented_world(path) -> int:
    """Ranks of the launch command in the config's header (1 where it names no GPUs)."""
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    nodes = re.search(r"--nodes=(\d+)", header)
    gpus = re.search(r"--gpus-per-node=(\d+)", header)
    return (int(nodes[1]) if nodes else 1) * (int(gpus[1]) if gpus else 1)


def test_the_check_catches_the_old_scale_configs():
    """256 sequences in micro-batches of 8 (the old text-350m) do not divide over 64 or 128 ranks."""
    old = load_experiment(str(ROOT / "configs" / "experiments" / "text-350m.yaml"), ["train.micro_batch_size=8"])
    assert divides(old, 32) and not divides(old, 64) and not divides(old, 128)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_config_divides_where_it_is_meant_to_run(path):
    cfg = load_experiment(str(path), [])
    t = cfg.train
    world = documented_world(path)
    worlds = sorted({world, *(SCALE_WORLDS if world >= 8 else ())})
    bad = [w for w in worlds if not divides(cfg, w)]
    assert not bad, (f"{path.name}: train.global_batch_size={t.global_batch_size} does not divide into "
                     f"micro-batches of {t.micro_batch_size} over {bad} ranks")


def test_the_scale_configs_are_the_ones_the_issue_names():
    scale = {p.stem for p in EXPERIMENTS if documented_world(p) >= 8}
    assert {"text-350m", "text-1.3b", "gsm-inf-hard"} <= scale, scale
