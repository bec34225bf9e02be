"""`megasleep export`: a DeepSpeed checkpoint (made here with DeepSpeed on CPU, one process) becomes an
HF-style directory whose weights are the trained ones and whose model gives identical logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megasleep.checkpoint.load import load_pretrained
from megasleep.cli import main
from megasleep.models import HybridLM, ModelConfig
from megasleep.sleep import SleepConfig, sleep_forward
from tests.train.helpers import pythonpath

MODEL = {"name": "ds-test", "vocab_size": 61, "d_model": 32, "pattern": "AGMA", "attn": {"n_heads": 4, "n_kv_heads": 2},
         "mamba2": {"d_state": 8, "headdim": 8, "chunk_size": 8}, "gdn": {"n_heads": 2, "head_dim": 8, "chunk_size": 8},
         "kernels": "torch"}


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory) -> Path:
    """DeepSpeed checkpoints after one training step: ZeRO-2 (ds2) and no ZeRO (ds0)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("ds")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath()}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("_make_ds_checkpoint.py")), str(root), "2,0",
                        json.dumps(MODEL)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "saved" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    return root


@pytest.mark.parametrize("stage", [2, 0])
def test_export_deepspeed_checkpoint(tmp_path, ds_root, stage):
    ds = ds_root / f"ds{stage}"
    (tmp_path / "model.json").write_text(json.dumps(MODEL))
    out = tmp_path / "export"
    assert main(["export", str(ds), "--config", str(tmp_path / "model.json"), "--out", str(out),
                 "--window", "8", "--passes", "2"]) == 0
    model = load_pretrained(out)
    ref = torch.load(ds / "reference.pt", weights_only=True)
    sd = model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    meta = model.pretrained_meta
    assert meta["sleep"] == {"window": 8, "passes": 2}
    assert meta["source"]["consolidation"] == ("zero_to_fp32" if stage else "model_states")
    # the trained weights in the trained architecture: same logits as a HybridLM holding them
    twin = HybridLM(ModelConfig(**MODEL))
    twin.load_state_dict(ref)
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        for cfg in (SleepConfig(window=20), SleepConfig(window=8, passes=2)):
            assert torch.equal(sleep_forward(model, ids, cfg, return_logits=True).logits,
                               sleep_forward(twin.eval(), ids, cfg, return_logits=True).logits)


def test_export_with_training_marker_and_errors(tmp_path, ds_root):
    ds = tmp_path / "ds2"
    shutil.copytree(ds_root / "ds2", ds)
    # the trainer's completion marker carries the resolved config (model inline) and the sleep settings
    marker = {"step": 1, "config": {"model": MODEL, "sleep": {"window": 8, "passes": 3, "eviction": "sliding"}}}
    (ds / "global_step1" / "megasleep.json").write_text(json.dumps(marker))
    out = tmp_path / "export"
    assert main(["export", str(ds / "global_step1"), "--out", str(out)]) == 0  # a tag dir works too
    meta = load_pretrained(out).pretrained_meta
    assert meta["sleep"] == {"window": 8, "passes": 3, "eviction": "sliding"} and meta["source"]["step"] == 1
    (ds / "global_step1" / "megasleep.json").unlink()
    assert main(["export", str(ds), "--out", str(tmp_path / "x")]) == 2          # no config anywhere
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 2
    bad = dict(MODEL, d_model=48)
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["export", str(ds), "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "z")]) == 2
    assert not (tmp_path / "z").exists()
