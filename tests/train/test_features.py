"""One short run exercising the paper-recipe switches together: Muon (hidden matrices) + AdamW, a WSD
schedule, bf16 autocast, random N per step, truncated backprop, init from an exported model, training
only some parameters, and the TensorBoard / W&B (offline) sinks. Checked from the run's outputs."""

from __future__ import annotations

import json

import pytest
import torch

from megasleep.sleep import SleepConfig
from megasleep.train.config import OptimConfig
from megasleep.train.optim import lr_multiplier
from tests.train.faults import fault_env
from tests.train.helpers import run_train


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_paper_recipe_switches(tmp_path):
    from megasleep.checkpoint.released import save_pretrained
    from megasleep.checkpoint.weights import load_weights
    from megasleep.models import HybridLM
    from megasleep.train.config import load_experiment

    init = tmp_path / "init"
    torch.manual_seed(123)
    save_pretrained(HybridLM(load_experiment(None).model_cfg), init)
    src = load_weights(init)

    run = tmp_path / "run"
    steps = 6
    p = run_train(
        f"run_dir={run}", f"train.steps={steps}", "train.log_every=1", "train.global_batch_size=4",
        "train.micro_batch_size=2", "train.precision=bf16-autocast", "optim.name=muon", "optim.schedule=wsd",
        "optim.warmup_steps=2", "optim.decay_fraction=0.5", "sleep.random_passes=[1,3]", "sleep.random_seed=7",
        "sleep.truncate_backprop=1", f"checkpoint.init_from={init}", "optim.trainable=[layers.1.*,layers.3.*]",
        "eval.eval_passes=[1,3]", "eval.samples=8", "logging.tensorboard=true", "logging.wandb.enabled=true")
    assert "(bf16-autocast)" in p.stderr and "optim muon" in p.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    # random N: drawn from (seed, step), reproducible, within [1, 3]
    sleep = SleepConfig(window=24, random_passes=(1, 3), random_seed=7)
    assert [r["passes"] for r in train] == [sleep.passes_for_step(s) for s in range(steps)]
    assert len({r["passes"] for r in train}) > 1
    # WSD: muon and adamw groups both follow base_lr x multiplier(step)
    opt = OptimConfig(schedule="wsd", warmup_steps=2, decay_fraction=0.5)
    for r in train:
        m = lr_multiplier(r["step"] - 1, steps, opt)
        assert r["lr_groups"][0] == torch.tensor(2e-3 * m).item() or abs(r["lr_groups"][0] - 2e-3 * m) < 1e-12
    # init_from + trainable: frozen tensors are exactly the initial ones, trained ones moved
    out = load_weights(run / "export")
    for name, t in out.items():
        moved = not torch.equal(t, src[name])
        assert moved == (name.startswith(("layers.1.", "layers.3."))), name
    ev = json.loads((run / "eval.json").read_text())["results"]
    assert {r["passes"] for r in ev} == {1, 3}
    # metric sinks: TensorBoard event file; W&B offline when installed, else a note and no failure
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    try:
        import wandb  # noqa: F401

        assert (run / "wandb").is_dir()
    except ImportError:
        assert "wandb is not installed" in p.stderr


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    """A NaN loss (fault hook) gives non-finite gradients: the step is skipped and logged, the weights
    stay finite (later losses are finite); `max_bad_steps` in a row stop the run with exit status 3,
    status.json 'failed', and no checkpoint written during the bad streak."""
    run = tmp_path / "run"
    p = run_train(f"run_dir={run}", "train.steps=8", "train.log_every=1", "train.global_batch_size=4",
                  "train.micro_batch_size=2", "train.max_bad_steps=3", "optim.warmup_steps=2",
                  "checkpoint.every=2", "eval.at_end=false", "logging.tensorboard=false", check=False,
                  extra_env=fault_env(nan_loss_steps=[3, 5, 6, 7]))
    assert p.returncode == 3, p.stderr[-3000:]
    assert "3 non-finite steps in a row" in p.stderr and "step_00000004" in p.stderr
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "skipped"] == [3, 5, 6, 7]
    train = {r["step"]: r for r in recs if r["kind"] == "train"}
    assert all(torch.isfinite(torch.tensor(train[s]["loss"])) for s in (1, 2, 4))
    assert train[4]["skipped_steps"] == 1
    st = json.loads((run / "status.json").read_text())
    assert st["state"] == "failed" and st["step"] == 7
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000004"
    assert sorted(d.name for d in ckpt.iterdir() if d.is_dir()) == ["step_00000002", "step_00000004"]
