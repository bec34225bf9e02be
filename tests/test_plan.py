"""`megasleep plan`: model states agree with DeepSpeed's estimators, activations agree with what a real
CPU step keeps for backward, the batch/world check, and the command line."""

from __future__ import annotations

import sys

import pytest
import torch

from megasleep.plan import activation_parts, batch_problems, model_state_bytes, plan
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import ROOT, tiny_model

TINY = str(ROOT / "configs/experiments/tiny-demo.yaml")


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 4)])
def test_model_states_agree_with_deepspeed_estimators(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    model = tiny_model("MAGA", dtype=torch.float32)
    total, largest = model_to_params(model)  # DeepSpeed's own count (tied weights once)
    assert total == model.num_parameters()
    world = gpus * nodes
    _, ds2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False,
                                                      cpu_offload_params=False)
    ours = {s: sum(model_state_bytes(total, largest, s, world, "bf16").values()) for s in (2, 3)}
    assert abs(ours[2] - ds2) <= 1 and abs(ours[3] - ds3) <= 1
    # the trainer's fp32 + autocast accounting: 16 bytes/param unsharded, shrinking with the stage
    fp32 = [sum(model_state_bytes(total, largest, s, world, "autocast").values()) for s in range(4)]
    assert fp32[0] == 18 * total and (world == 1 or fp32[0] > fp32[1] > fp32[2] > fp32[3])


def _measured_saved(model, ids, cfg) -> int:
    """Bytes of distinct storages autograd keeps for backward during a real forward (CPU), parameters
    excluded."""
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sleep_forward(model, ids, cfg)
    out.loss.backward()
    return sum(seen.values())


@pytest.mark.parametrize("policy", [dict(checkpoint=False), dict(checkpoint=True),
                                    dict(checkpoint=True, checkpoint_blocks=2)], ids=["none", "pass", "blocks2"])
@pytest.mark.parametrize("passes", [1, 3])
def test_activation_estimate_matches_a_real_cpu_step(policy, passes):
    """Planned 'kept for backward' vs the bytes a real fp32 CPU step keeps: within 15% (the plan
    counts every saved tensor of a block; a real step shares a few storages across blocks)."""
    model = tiny_model("GAMAGM", n_prelude=1, n_coda=1, dtype=torch.float32, d=64)
    b, T = 4, 48
    cfg = SleepConfig(window=16, passes=passes, **policy)
    stored, recompute = activation_parts(model, cfg, b, T, torch.float32, device="cpu")
    measured = _measured_saved(model, torch.randint(0, 61, (b, T)), cfg)
    assert abs(stored - measured) <= 0.15 * measured, (stored, measured)
    # backward adds a recomputed block on top under blocks:k; under per-pass nothing (the last window's
    # pass, freed first, is as large as any pass it recomputes); without checkpointing nothing
    assert recompute > 0 if policy.get("checkpoint_blocks") else recompute == 0


def test_batch_world_check_and_plan_of_a_shipped_config(tmp_path):
    p = plan(TINY, nodes=2, gpus_per_node=3, gpu_mem_gib=80)
    assert p["params"] > 0 and p["activations"] > 0 and p["fits"]
    assert p["model_flops_per_step"] > 0 and p["flops_per_step"] >= p["model_flops_per_step"]
    from megasleep.train.config import load_experiment

    exp = load_experiment(TINY)
    g, m = exp.train.global_batch_size, exp.train.micro_batch_size
    assert batch_problems(exp, g // m) == []
    bad = batch_problems(exp, g // m + 1)
    assert len(bad) == 1 and "global_batch_size" in bad[0] and str(g // m + 1) in bad[0]


def test_cli(capsys):
    from megasleep.cli import main

    argv = sys.argv
    try:
        rc = main(["plan", TINY, "--nodes", "1", "--gpus-per-node", "1", "--gpu-mem", "80"])
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert rc == 0 and "fits" in out and "model FLOPs" in out and "ZeRO-" in out
    try:
        rc = main(["plan", TINY, "sleep.checkpoint_blocks=1", "--gpu-mem", "0.0001"])
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out and "every 1 block(s)" in out


def test_precision_follows_the_config_and_zero3_counts_the_kept_gathered_weights():
    """Without --precision the plan uses train.precision; ZeRO-3 with zero3_keep_gathered (the default)
    adds one full copy of the weights in their dtype, and switching it off removes exactly that."""
    base = ["deepspeed.zero_stage=3"]
    bf16 = plan(TINY, 1, 8, 80, overrides=[*base, "train.precision=bf16"])
    auto = plan(TINY, 1, 8, 80, overrides=[*base, "train.precision=auto"])
    fp32 = plan(TINY, 1, 8, 80, overrides=[*base, "train.precision=fp32"])
    assert (bf16["precision"], auto["precision"], fp32["precision"]) == ("bf16", "autocast", "fp32")
    P = bf16["params"]
    assert bf16["model_states"]["kept gathered weights"] == 2 * P
    assert fp32["model_states"]["kept gathered weights"] == 4 * P
    assert "autocast weight copies" in auto["model_states"] and "autocast weight copies" not in fp32["model_states"]
    off = plan(TINY, 1, 8, 80, overrides=[*base, "train.precision=bf16", "deepspeed.zero3_keep_gathered=false"])
    assert "kept gathered weights" not in off["model_states"]
    assert sum(bf16["model_states"].values()) - sum(off["model_states"].values()) == 2 * P
    z2 = plan(TINY, 1, 8, 80, overrides=["deepspeed.zero_stage=2", "train.precision=bf16"])
    assert "kept gathered weights" not in z2["model_states"]  # only ZeRO-3 gathers weights
    assert plan(TINY, 1, 8, 80, precision="autocast", overrides=[*base, "train.precision=bf16"])["precision"] == "autocast"
