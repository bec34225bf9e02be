"""ZeRO-3 parameter all-gathers per training step, counted on 2 gloo ranks (tests/train/zero3_gathers.py
wraps DeepSpeed's all-gather). The sleep loop runs every core block once per (window, pass) and again
in backward; when DeepSpeed's live/reuse limits are below the model's size (as its 1e9 default is
for the 7b config) every pass regathers the core. ``deepspeed.zero3_keep_gathered`` (default) raises
them to the model's size: each weight is gathered at most once per micro-batch, whatever N.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from tests.train.helpers import PY, ROOT, env

ACCUM = 2  # 8 sequences = micro-batch 2 x 2 accumulation steps x 2 ranks
RUN = ["train.steps=3", "train.log_every=1", f"train.global_batch_size={2 * ACCUM * 2}", "train.micro_batch_size=2",
       "optim.warmup_steps=1", "eval.at_end=false", "logging.tensorboard=false", "logging.progress=false",
       "checkpoint.export=false", "checkpoint.every=0", "checkpoint.resume=never",
       "deepspeed.config=configs/deepspeed/zero3.json",
       # every weight is partitioned (the tiny model's tensors are all under the shipped threshold)
       "deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=0",
       # limits at a third of the tiny model, as DeepSpeed's 1e9 default is to the 7b config's 7.1e9
       "deepspeed.overrides.zero_optimization.stage3_max_live_parameters=100000",
       "deepspeed.overrides.zero_optimization.stage3_max_reuse_distance=100000",
       "deepspeed.overrides.zero_optimization.stage3_prefetch_bucket_size=100000"]


def gathers(tmp_path, configs: list[tuple[int, bool]]) -> dict:
    """The runs of ``configs`` ((passes, keep_gathered) each), all in one torchrun."""
    runs = [{"name": f"n{n}-{'keep' if keep else 'json'}", "run_dir": str(tmp_path / f"n{n}-{keep}"),
             "overrides": [f"sleep.passes={n}", f"deepspeed.zero3_keep_gathered={str(keep).lower()}"]}
            for n, keep in configs]
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--nproc-per-node", "2", "tests/train/zero3_gathers.py",
                        str(tmp_path), json.dumps(runs), *RUN],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return {c: json.loads((tmp_path / f"{r['name']}.json").read_text()) for c, r in zip(configs, runs)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return gathers(tmp_path_factory.mktemp("zero3"), [(n, keep) for n in (1, 3) for keep in (False, True)])


def steady(run: dict) -> int:
    """Elements all-gathered per step once DeepSpeed's trace is built (step 1 records it)."""
    later = [s["numel"] for s in run["steps"][1:]]
    assert len(set(later)) == 1, run["steps"]
    return later[0]


def test_regathers_every_pass_under_the_json_limits(runs):
    params = runs[1, False]["params"]
    one, three = steady(runs[1, False]), steady(runs[3, False])
    assert one > ACCUM * params  # even at N = 1: forward, recomputation and backward gather separately
    assert three > 1.5 * one, (one, three)  # and each sleep pass gathers the core again


def test_keep_gathered_gathers_each_weight_once_per_micro_batch(runs):
    params = runs[1, True]["params"]
    for n in (1, 3):
        assert steady(runs[n, True]) <= ACCUM * params, (n, runs[n, True]["steps"])
    # the same maths: the gather policy changes nothing in the losses
    for n in (1, 3):
        torch.testing.assert_close(torch.tensor(runs[n, True]["losses"]), torch.tensor(runs[n, False]["losses"]),
                                   rtol=0, atol=0)
