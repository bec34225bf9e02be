"""Collapse diagnostics against independent calculations and models built to give known answers."""

from __future__ import annotations

import pytest
import torch

from megasleep.models import MixContext
from megasleep.sleep import SleepConfig
from megasleep.sleep.diagnostics import (
    collapse_diagnostics,
    collapse_status,
    diagnostics_table,
    max_key_share,
)
from tests.conftest import tiny_model

L = 6


def ids_for(model, B=4, windows=2, seed=0):
    return torch.randint(0, model.config.vocab_size, (B, windows * L), generator=torch.Generator().manual_seed(seed))


def identical_keys_model():
    """AG model in which every position of every pass carries the same features, so every key is the
    same: all token embeddings equal, attention averages equal values, the GDN writes nothing (v = 0,
    so S stays 0 and its output is 0), and its key conv keeps only the current position."""
    model = tiny_model("AG")
    gdn = model.layers[1].mixer
    with torch.no_grad():
        model.embed_tokens.weight.copy_(model.embed_tokens.weight[:1].expand_as(model.embed_tokens.weight))
        gdn.v_proj.weight.zero_()
        gdn.k_conv1d.weight[..., :-1] = 0
    return model


def test_identical_keys_score_key_share_one():
    model = identical_keys_model()
    d = collapse_diagnostics(model, {"input_ids": ids_for(model)}, SleepConfig(window=L, passes=3))
    for j in (1, 2, 3):
        assert d[f"diag/pass{j}/G1/key_share"] == pytest.approx(1.0, abs=1e-9)
        assert d[f"diag/pass{j}/G1/input_top_share"] == pytest.approx(1.0, abs=1e-9)
        assert d[f"diag/pass{j}/G1/input_erank"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("pad_id", [None, 0])
def test_key_share_matches_the_keys_the_kernel_received(monkeypatch, pad_id):
    """Independent route to the keys: record the ``k`` every gated-delta call hands its kernel (and,
    with ``pad_id``, drop the padded positions by hand)."""
    import megasleep.models.gdn as gdn_module

    model = tiny_model("AG", seed=3)
    ids = ids_for(model, seed=5)
    ids[:, :2] = 0  # two pad tokens open every sample
    keep = slice(2, L) if pad_id == 0 else slice(0, L)
    seen = []
    real = gdn_module.gated_delta_rule

    def spy(q, k, *args, **kwargs):
        seen.append(k.detach().clone())
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(gdn_module, "gated_delta_rule", spy)
    d = collapse_diagnostics(model, {"input_ids": ids}, SleepConfig(window=L, passes=3), pad_id=pad_id)
    # calls: window 1 passes 1..3, window 2 wake (not a consolidation window); then the rolled-state forward
    assert len(seen) >= 4
    for j in (1, 2, 3):
        k = seen[j - 1][:, keep]  # [B, positions, H, K]
        want = float(k.mean(1).pow(2).sum(-1).mean())
        assert d[f"diag/pass{j}/G1/key_share"] == pytest.approx(want, rel=1e-9)
        assert want < 0.9
    # residual RMS of the wake pass, computed directly
    with torch.no_grad():
        h, _ = model.run_blocks(model.core_idx, model.embed(ids[:, :L]), model.init_caches(4, dtype=torch.float64),
                                MixContext.for_span(0, L, L))
    assert d["diag/pass1/rms"] == pytest.approx(float(h[:, keep].pow(2).mean().sqrt()), rel=1e-9)


def test_model_that_ignores_its_state_has_memory_worth_zero():
    model = tiny_model("AG", seed=1)
    with torch.no_grad():
        model.layers[1].mixer.o_proj.weight.zero_()  # the GDN read never reaches the output
    d = collapse_diagnostics(model, {"input_ids": ids_for(model)}, SleepConfig(window=L, passes=2))
    assert d["diag/memory_worth"] == 0.0
    used = collapse_diagnostics(tiny_model("AG", seed=1), {"input_ids": ids_for(model)}, SleepConfig(window=L, passes=2))
    assert abs(used["diag/memory_worth"]) > 1e-6  # with the read in place, another sample's S changes the loss


def test_list_of_batches_and_bad_batch():
    model = tiny_model("AG")
    ids = ids_for(model, B=4)
    cfg = SleepConfig(window=L, passes=2)
    whole = collapse_diagnostics(model, {"input_ids": ids}, cfg)
    assert whole["diag/passes"] == 2.0 and "diag/pass3/rms" not in whole
    split = collapse_diagnostics(model, [{"input_ids": ids[:2]}, {"input_ids": ids[2:]}], cfg)
    assert split["diag/loss"] == pytest.approx(whole["diag/loss"], rel=1e-12)
    assert split["diag/pass2/G1/key_share"] == pytest.approx(whole["diag/pass2/G1/key_share"], rel=1e-12)
    with pytest.raises(ValueError, match=">= 2 samples"):
        collapse_diagnostics(model, {"input_ids": ids[:1]}, cfg)


def synthetic(passes, shares):
    return {"diag/passes": float(passes), **{f"diag/pass{j}/G1/key_share": s for j, s in enumerate(shares, 1)}}


def test_collapse_rule():
    assert collapse_status(synthetic(1, [0.2])) == "awake"
    assert collapse_status(synthetic(4, [0.3, 0.5, 0.8, 0.95])) == "collapsed"
    assert collapse_status(synthetic(4, [0.3, 0.5, 0.8, 0.85])) == "ok"
    assert collapse_status(synthetic(2, [0.7, 0.95])) == "shared keys"
    # a reference (the N = 1 model of the same seed) decides what "diverse awake" means
    assert collapse_status(synthetic(2, [0.7, 0.95]), reference=synthetic(1, [0.3])) == "collapsed"
    assert collapse_status({"diag/passes": 2.0}) == "unknown"
    assert max_key_share({**synthetic(2, [0.1, 0.2]), "diag/pass2/G3/key_share": 0.6}, 2) == 0.6
    table = diagnostics_table({"N2-seed0": (synthetic(2, [0.3, 0.95]), "collapsed")})
    assert "| N2-seed0 | 2 | - | 0.300 | 0.950 | - | - | collapsed |" in table
