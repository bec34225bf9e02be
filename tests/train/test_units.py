"""Fast unit tests of the trainer's pieces (no process group, no DeepSpeed engine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megasleep.train.checkpoint import (
    MARKER,
    CheckpointError,
    CheckpointManager,
    complete_tags,
    find_latest,
    resolve_resume,
)
from megasleep.train.config import OptimConfig, load_experiment
from megasleep.train.optim import is_hidden_matrix, lr_multiplier, param_groups


def test_schedules():
    total = 100
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    m = [lr_multiplier(s, total, cos) for s in range(total)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[9:], m[10:]))  # non-increasing after warmup
    assert m[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    w = [lr_multiplier(s, total, wsd) for s in range(total)]
    assert w[10:80] == [1.0] * 70  # stable
    assert w[80] < 1.0 and w[-1] == pytest.approx(0.0) and all(a > b for a, b in zip(w[80:], w[81:]))
    const = OptimConfig(schedule="constant", warmup_steps=0)
    assert {lr_multiplier(s, total, const) for s in range(total)} == {1.0}


def test_muon_groups_take_hidden_matrices_only():
    from megasleep.models import HybridLM

    cfg = load_experiment(None, ["optim.name=muon"])
    model = HybridLM(cfg.model_cfg)
    groups = param_groups(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for p in groups[0]["params"]]
    assert groups[0]["use_muon"] and groups[0]["lr"] == cfg.optim.muon_lr
    assert "layers.0.mixer.q_proj.weight" in muon and "layers.1.mlp.down_proj.weight" in muon
    assert not any(("embed" in n or "conv1d" in n or "A_log" in n or "norm" in n) for n in muon)
    rest = {names[id(p)]: g["name"] for g in groups[1:] for p in g["params"]}
    assert rest["embed_tokens.weight"] == "adamw_decay"
    assert rest["layers.1.mixer.A_log"] == "adamw_no_decay" and rest["layers.1.mixer.dt_bias"] == "adamw_no_decay"
    n_params = len({id(p) for p in model.parameters()})
    assert sum(len(g["params"]) for g in groups) == n_params  # every parameter exactly once
    assert all(p.use_muon == is_hidden_matrix(names[id(p)], p) for p in model.parameters())


def test_task_stream_global_batch_does_not_depend_on_the_split(tmp_path):
    """Step s holds samples [sG, (s+1)G) whatever the (world size, accumulation) split."""
    from megasleep.train.data import TaskStream, task_tokenizer

    tok = task_tokenizer("rule110", tmp_path, 0, lambda: None)

    def keys(world, micro):
        seen = []
        for rank in range(world):
            ts = TaskStream("rule110", tok, seed=3, split="train", difficulty="1-4", params={}, micro_batch=micro,
                            global_batch=8, rank=rank, world=world)
            for b in ts.batches(5):
                seen += [(m["index"], m["answer"]) for m in b["meta"]]
        return sorted(seen)

    one = keys(1, 2)
    assert one == keys(2, 4) == keys(2, 2) == keys(4, 2)
    assert [i for i, _ in one] == list(range(40, 48))


def test_flops_scale_with_passes():
    from megasleep.models import HybridLM
    from megasleep.train.metrics import FlopCounter

    cfg = load_experiment(None)
    fc = FlopCounter(HybridLM(cfg.model_cfg))
    one = fc.forward_flops(8, 101, 24, "hard", [1] * 5, [0, 0, 0, 0, 4])
    two = fc.forward_flops(8, 101, 24, "hard", [2, 2, 2, 2, 1], [0, 0, 0, 0, 4])
    head = 8 * 5 * 2.0 * fc.head
    core_one = one - head
    assert two - head == pytest.approx(core_one + 8 * 96 * fc.core_per_token(12.5), rel=1e-6)
    assert 1.5 < (two - head) / core_one < 2.0
    # about 2 x (matmul params) per token and pass
    assert fc.core_per_token(1) >= 2 * fc.core_lin


class FakeEngine:
    """What CheckpointManager needs of a DeepSpeed engine."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False
        d = save_dir + "/" + tag
        import os

        os.makedirs(d, exist_ok=True)
        if self.fail_at == tag:
            raise OSError("disk full (simulated)")
        torch.save({"client": client_state}, d + "/mp_rank_00_model_states.pt")

    def load_checkpoint(self, load_dir, tag, **kw):
        return load_dir + "/" + tag, torch.load(f"{load_dir}/{tag}/mp_rank_00_model_states.pt")["client"]


def test_checkpoint_protocol(tmp_path):
    ck = tmp_path / "ckpts"
    mgr = CheckpointManager(ck, keep_last=2, rank=0, world=1, barrier=lambda: None)
    for step in (3, 6, 9):
        mgr.save(FakeEngine(), step, {"step": step}, {"data": step})
    assert complete_tags(ck) == ["step_00000006", "step_00000009"]  # keep-last-2
    assert (ck / "latest").read_text() == "step_00000009"
    assert json.loads((ck / "step_00000009" / MARKER).read_text())["world_size"] == 1
    # a save that dies half-way leaves latest alone, and the leftovers are ignored
    with pytest.raises(CheckpointError, match="step_00000009 is intact"):
        mgr.save(FakeEngine(fail_at="step_00000012"), 12, {"step": 12}, {})
    assert find_latest(ck) == "step_00000009"
    assert resolve_resume("auto", ck) == (ck, "step_00000009")
    client, rank_state = mgr.load(FakeEngine(), ck, "step_00000009")
    assert client == {"step": 9} and rank_state == {"data": 9}
    # `latest` pointing at a broken checkpoint falls back to the newest complete one
    (ck / "latest").write_text("step_00000012")
    assert find_latest(ck) == "step_00000009"
    # the next good save cleans the half-written directory up
    mgr.save(FakeEngine(), 15, {"step": 15}, {})
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000009", "step_00000015"]
    # another world size loads (a ZeRO-0 checkpoint is one file; ZeRO 1-3 reshard: test_reshard.py), and
    # each new rank takes the data/RNG state of old rank (new rank mod old world)
    other = CheckpointManager(ck, keep_last=2, rank=1, world=2, barrier=lambda: None)
    client, rank_state = other.load(FakeEngine(), ck, "step_00000015")
    assert client == {"step": 15} and rank_state == {}


def test_resolve_resume_errors(tmp_path):
    assert resolve_resume("auto", tmp_path / "nothing") is None
    assert resolve_resume("never", tmp_path) is None
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_resume(str(tmp_path / "empty"), tmp_path)


def test_peak_flops_source():
    from megasleep.train.metrics import peak_flops

    f, src = peak_flops(torch.device("cpu"), 2.0)
    assert f == 2e12 and src == "logging.peak_tflops"
    f, src = peak_flops(torch.device("cpu"), None)
    assert f > 1e8 and "measured" in src and math.isfinite(f)
