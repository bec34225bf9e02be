"""Sleep semantics (docs/sleep.md), on fresh random models and tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megasleep.models import MixContext
from megasleep.sleep import SleepConfig, SleepRunner, sleep_forward
from tests.conftest import tiny_model

PATTERNS = ["AGMA", "GAMG", "MAGMA"]


def rand_ids(model, B=2, T=21, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_n1_hard_equals_independent_windows_with_state_handoff(pattern):
    model = tiny_model(pattern, n_prelude=1 if len(pattern) > 4 else 0, n_coda=1 if len(pattern) > 4 else 0)
    ids, L = rand_ids(model, T=19), 5
    out = sleep_forward(model, ids, SleepConfig(window=L, passes=1), return_logits=True)
    # reference: each window run on its own through all blocks; only the SSM fast weights handed over
    caches = model.init_caches(ids.shape[0], dtype=torch.float64)
    ref = []
    for s in range(0, ids.shape[1], L):
        e = min(s + L, ids.shape[1])
        fresh = model.init_caches(ids.shape[0], dtype=torch.float64)
        for i, c in enumerate(fresh):
            c.ssm = caches[i].ssm
        h, caches = model.run_blocks(range(len(model.layers)), model.embed(ids[:, s:e]), fresh,
                                     MixContext.for_span(0, e - s, L))
        ref.append(model.head(h))
    torch.testing.assert_close(out.logits, torch.cat(ref, 1), rtol=1e-10, atol=1e-10)


class ZeroHandoff(SleepRunner):
    def evict(self, caches):
        caches = super().evict(caches)
        for c in caches:
            if c.ssm is not None:
                c.ssm = torch.zeros_like(c.ssm)
        return caches


@pytest.mark.parametrize("eviction", ["hard"])
@pytest.mark.parametrize("passes", [1, 3])
def test_state_is_the_only_channel(passes, eviction):
    model = tiny_model("AGMA")
    L = 6
    ids = rand_ids(model, T=3 * L)
    ids2 = ids.clone()
    ids2[:, :L] = (ids2[:, :L] + 7) % model.config.vocab_size  # change window 1 only
    cfg = SleepConfig(window=L, passes=passes, eviction=eviction)
    w3 = slice(2 * L, 3 * L)
    a = ZeroHandoff(model, cfg)(ids, return_logits=True).logits[:, w3]
    b = ZeroHandoff(model, cfg)(ids2, return_logits=True).logits[:, w3]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # ... and with the hand-off in place window 1 does reach window 3
    a = sleep_forward(model, ids, cfg, return_logits=True).logits[:, w3]
    b = sleep_forward(model, ids2, cfg, return_logits=True).logits[:, w3]
    assert (a - b).abs().max() > 1e-6


@pytest.mark.parametrize("passes", [1, 2])
def test_gradient_reaches_window1_embeddings_through_state(passes):
    model = tiny_model("AGMA", vocab=40, tie_embeddings=False)   # a tied head would touch every row
    L, T = 5, 15
    ids = torch.randint(20, 40, (2, T))
    ids[:, :L] = torch.randint(0, 20, (2, L))       # tokens 0..19 appear only in window 1
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2 * L + 1:] = True                       # loss only on window-3 targets
    out = sleep_forward(model, ids, SleepConfig(window=L, passes=passes), loss_mask=mask)
    out.loss.backward()
    g = model.embed_tokens.weight.grad
    used = ids[:, :L].unique()
    assert g[used].abs().sum() > 0, "no gradient reached window-1 embeddings"
    assert g[torch.tensor([i for i in range(20) if i not in used.tolist()])].abs().sum() == 0


def test_more_passes_change_final_states():
    model = tiny_model("AGMA")
    ids = rand_ids(model, T=16)
    s1 = sleep_forward(model, ids, SleepConfig(window=4, passes=1)).caches
    s3 = sleep_forward(model, ids, SleepConfig(window=4, passes=3)).caches
    diffs = [(a.ssm - b.ssm).abs().max() for a, b in zip(s1, s3) if a.ssm is not None]
    assert len(diffs) == 2 and all(d > 1e-6 for d in diffs)


@pytest.mark.parametrize("pattern", ["AGMA", "MAGMA"])
def test_checkpointing_gives_same_gradients(pattern):
    grads = []
    for ckpt in (False, True):
        model = tiny_model(pattern, n_prelude=1 if len(pattern) > 4 else 0)
        ids = rand_ids(model, T=17)
        out = sleep_forward(model, ids, SleepConfig(window=5, passes=3, checkpoint=ckpt))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12, msg=n)


def test_sliding_n1_equals_sliding_window_attention():
    model = tiny_model("AGMA")
    ids, L = rand_ids(model, T=23), 6
    out = sleep_forward(model, ids, SleepConfig(window=L, passes=1, eviction="sliding"), return_logits=True)
    # one call over the whole sequence: conv / SSM state flow naturally, attention is banded to L
    h, _ = model.run_blocks(range(4), model.embed(ids), model.init_caches(2, dtype=torch.float64),
                            MixContext.for_span(0, ids.shape[1], L))
    torch.testing.assert_close(out.logits, model.head(h), rtol=1e-9, atol=1e-10)


def test_banded_attention_matches_explicit_reference():
    model = tiny_model("A", n_prelude=0)
    attn = model.layers[0].mixer
    x = torch.randn(2, 11, model.config.d_model, dtype=torch.float64)
    L = 4
    y, _ = attn(x, model.init_caches(2)[0], MixContext.for_span(0, 11, L))
    from megasleep.models.attention import rope
    B, T, _ = x.shape
    q = rope(attn.q_proj(x).view(B, T, 4, -1).transpose(1, 2), torch.arange(T), attn.theta)
    k = rope(attn.k_proj(x).view(B, T, 2, -1).transpose(1, 2), torch.arange(T), attn.theta)
    v = attn.v_proj(x).view(B, T, 2, -1).transpose(1, 2)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    scores = scores.masked_fill(~((j <= i) & (i - j < L)), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_random_passes_seeded_by_step():
    cfg = SleepConfig(window=4, random_passes=(1, 4), random_seed=3)
    draws = [cfg.passes_for_step(s) for s in range(40)]
    assert draws == [cfg.passes_for_step(s) for s in range(40)]      # replayable, rank-independent
    assert set(draws) == {1, 2, 3, 4}
    model = tiny_model("AGMA")
    out = sleep_forward(model, rand_ids(model, T=12), cfg, step=7)
    assert out.passes == cfg.passes_for_step(7)


def test_truncated_backprop_only_last_k_passes_carry_gradient():
    model = tiny_model("AGMA")
    ids, L = rand_ids(model, T=15), 5
    grads = {}
    for k in (None, 1, 0):
        model.zero_grad()
        sleep_forward(model, ids, SleepConfig(window=L, passes=3, truncate_backprop=k)).loss.backward()
        grads[k] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert (grads[None] - grads[1]).abs().max() > 1e-8
    assert (grads[1] - grads[0]).abs().max() > 1e-8
    # forward values do not depend on truncation
    a = sleep_forward(model, ids, SleepConfig(window=L, passes=3)).loss
    b = sleep_forward(model, ids, SleepConfig(window=L, passes=3, truncate_backprop=0)).loss
    torch.testing.assert_close(a, b)


def test_adaptive_sleep_stops_early_and_reports_passes():
    model = tiny_model("AGMA")
    ids = rand_ids(model, T=20)
    with torch.no_grad():
        loose = sleep_forward(model, ids, SleepConfig(window=5, passes=6, adaptive_tol=10.0))
        tight = sleep_forward(model, ids, SleepConfig(window=5, passes=6, adaptive_tol=1e-300))
    assert loose.passes_used == [2, 2, 2, 1]          # the first sleep pass always runs; last window never sleeps
    assert tight.passes_used == [6, 6, 6, 1]


def test_document_boundaries_reset_state():
    model = tiny_model("AGMA")
    L, T = 4, 16
    ids = rand_ids(model, T=T)
    doc = torch.zeros_like(ids)
    doc[:, 9:] = 1                                   # second document starts mid-window
    ids2 = ids.clone()
    ids2[:, :9] = (ids2[:, :9] + 5) % model.config.vocab_size
    for eviction in ("hard", "sliding"):
        cfg = SleepConfig(window=L, passes=2, eviction=eviction)
        a = sleep_forward(model, ids, cfg, doc_ids=doc, return_logits=True).logits[:, 9:]
        b = sleep_forward(model, ids2, cfg, doc_ids=doc, return_logits=True).logits[:, 9:]
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_loss_is_masked_cross_entropy():
    model = tiny_model("AGMA")
    ids = rand_ids(model, T=13)
    mask = torch.rand(ids.shape) > 0.5
    mask[:, 0] = False
    out = sleep_forward(model, ids, SleepConfig(window=4, passes=2), loss_mask=mask, return_logits=True)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    ref = (ce * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
    torch.testing.assert_close(out.loss, ref)
    assert out.n_tokens == int(mask[:, 1:].sum()) and len(out.window_loss) == 4


def test_bad_inputs_are_clear():
    model = tiny_model("AGMA")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\)"):
        sleep_forward(model, torch.tensor([[1, 2, 99]]), SleepConfig(window=2))
    with pytest.raises(ValueError, match="batch, time"):
        sleep_forward(model, torch.tensor([1, 2, 3]), SleepConfig(window=2))
