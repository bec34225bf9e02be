"""train.precision and train.compile through DeepSpeed's engine (CPU, gloo; the GPU run is in
benchmarks/gpu_check.sh).

bf16 under ZeRO-1/2: the trainer casts the weights and DeepSpeed's ZeRO optimizer keeps fp32 master
partitions and fp32 gradient accumulation; A_log / dt_bias / D stay fp32 through the engine. Under
ZeRO-3 DeepSpeed's own bf16 mode casts every parameter (its partitions share one buffer of one dtype).
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from megasleep.config import ConfigError
from megasleep.train.config import load_experiment
from megasleep.train.engine import build_ds_config
from tests.train.helpers import FAST, PY, ROOT, env

RUN = [*FAST, "checkpoint.every=0", "checkpoint.resume=never"]


def precision_run(tmp_path, name: str, *overrides: str, ranks: int = 1) -> dict:
    out = tmp_path / f"{name}.json"
    launcher = [PY, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)] if ranks > 1 else [PY]
    p = subprocess.run([*launcher, "tests/train/precision_run.py", str(out), str(tmp_path / name), *RUN, *overrides],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    return precision_run(tmp_path_factory.mktemp("fp32"), "fp32", "train.precision=fp32")


def test_precision_keys_of_the_deepspeed_json():
    cfg = load_experiment(None, ["deepspeed.zero_stage=1"])
    assert not {"bf16", "data_types", "communication_data_type"} & set(build_ds_config(cfg, 1))  # CPU auto = fp32
    assert not {"bf16", "data_types"} & set(build_ds_config(cfg, 1, "bf16-autocast"))
    z1 = build_ds_config(cfg, 1, "bf16")
    assert z1["bf16"] == {"enabled": False} and z1["data_types"] == {"grad_accum_dtype": "fp32"}
    assert z1["communication_data_type"] == "bf16"
    z3 = build_ds_config(load_experiment(None, ["deepspeed.zero_stage=3"]), 1, "bf16")
    assert z3["bf16"] == {"enabled": True} and z3["data_types"] == {"grad_accum_dtype": "fp32"}
    with pytest.raises(ConfigError) as exc:
        build_ds_config(load_experiment(None, ["deepspeed.zero_stage=0"]), 1, "bf16")
    msg = str(exc.value)
    assert "\n" not in msg and "tiny-demo.yaml" in msg and "ZeRO-0" in msg and "bf16-autocast" in msg, msg
    with pytest.raises(ConfigError, match="communication_data_type.*train.precision=bf16"):
        build_ds_config(load_experiment(None, ["deepspeed.overrides={communication_data_type: fp32}"]), 1, "bf16")
    with pytest.raises(ConfigError, match="compile_backend"):
        load_experiment(None, ["train.compile_backend=nonesuch"])


@pytest.mark.parametrize("stage, ranks", [(1, 1), (3, 1), pytest.param(2, 2, marks=pytest.mark.slow)])
def test_bf16_trains_through_deepspeed_with_planned_dtypes(tmp_path, fp32_run, stage, ranks):
    run = precision_run(tmp_path, f"bf16-z{stage}", "train.precision=bf16", f"deepspeed.zero_stage={stage}",
                        "checkpoint.export=true", ranks=ranks)
    kept = {n for n, d in run["dtypes"].items() if d == "torch.float32"}
    if stage < 3:
        # the tiny demo is AGAG: the GDN mixers' A_log and dt_bias (Mamba-2's D: tests/models/test_precision.py)
        assert kept == {f"layers.{i}.mixer.{p}" for i in (1, 3) for p in ("A_log", "dt_bias")}, kept
        # fp32 storage all through training: the kept weights are not bf16 numbers, the others are
        assert not any(run["bf16_exact"][n] for n in kept)
    else:
        assert not kept, kept  # DeepSpeed's bf16 mode: every parameter bf16
    assert all(ok for n, ok in run["bf16_exact"].items() if n not in kept)
    assert set(run["dtypes"].values()) - {"torch.float32"} == {"torch.bfloat16"}
    assert run["masters"] and set(run["masters"]) == {"torch.float32"}  # fp32 master weights
    assert len(run["losses"]) == len(fp32_run["losses"]) == 10
    # bf16 rounding only: the loss curve follows the fp32 one (measured: within 0.004 over 10 steps)
    assert max(abs(a - b) for a, b in zip(run["losses"], fp32_run["losses"])) < 0.03
    assert run["losses"][-1] < run["losses"][0] - 1.0
    # the export holds the fp32 master weights, not the bf16 copies the forward read
    from megasleep.checkpoint.weights import load_weights

    exported = load_weights(tmp_path / f"bf16-z{stage}" / "export")
    assert {t.dtype for t in exported.values()} == {torch.float32}
    assert not all(torch.equal(t, t.bfloat16().float()) for t in exported.values())


def test_compiled_blocks_train_like_eager_ones(tmp_path, fp32_run):
    """train.compile through DeepSpeed's engine with the "eager" backend (Dynamo graph capture: the
    inductor codegen takes minutes per shape on this CPU; benchmarks/gpu_check.sh compiles for real)."""
    run = precision_run(tmp_path, "compiled", "train.precision=fp32", "train.compile=true",
                        "train.compile_backend=eager")
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(fp32_run["losses"]), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it on a GPU)")
def test_bf16_on_cuda_through_deepspeed(tmp_path, fp32_run):
    """The same run on one GPU (NCCL, the CUDA kernels): dtypes as planned after DeepSpeed's engine
    init, fp32 master partitions, and the loss curve of the fp32 CPU run up to kernel differences."""
    run = precision_run(tmp_path, "bf16-cuda", "train.precision=bf16", "train.device=cuda")
    kept = {n for n, d in run["dtypes"].items() if d == "torch.float32"}
    assert kept == {f"layers.{i}.mixer.{p}" for i in (1, 3) for p in ("A_log", "dt_bias")}, kept
    assert set(run["masters"]) == {"torch.float32"}
    assert max(abs(a - b) for a, b in zip(run["losses"], fp32_run["losses"])) < 0.05


def test_bf16_resume_is_bit_identical(tmp_path):
    """A bf16 run resumed from its step-3 checkpoint logs the uninterrupted run's losses exactly: the
    checkpoint carries the fp32 master weights and the kept-fp32 parameters as they were."""
    from tests.train.helpers import losses, run_train

    common = [*FAST, "train.precision=bf16", "train.steps=6", "checkpoint.every=3", "checkpoint.keep_last=3"]
    run_train(*common, f"run_dir={tmp_path / 'full'}")
    src = tmp_path / "full" / "checkpoints" / "step_00000003"
    run_train(*common, f"run_dir={tmp_path / 'resumed'}", f"checkpoint.resume={src}")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in resumed), (full, resumed)
