"""The collapse remedies of SleepConfig: off by default (the paper's loop, bit for bit), and each one
does what it claims — checked against a hand-written loop on fresh random models and tokens."""

from __future__ import annotations

import pytest
import torch

from megasleep.models import MixContext
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model


def reference_loop(model, ids, L, passes, feed=lambda h, x0: h):
    """docs/sleep.md's pseudocode, written out: hard eviction, every sleep pass restarts from the
    window's start short-term memory, the next window inherits the wake pass's. ``feed(h, x0)`` is what
    enters a sleep pass. Returns logits [B, T, V]."""
    B, T = ids.shape
    caches = model.init_caches(B, dtype=model.embed_tokens.weight.dtype)
    out = []
    for s in range(0, T, L):
        e = min(s + L, T)
        ctx = MixContext.for_span(s, e, L)
        h, caches = model.run_blocks(model.prelude_idx, model.embed(ids[:, s:e]), caches, ctx)
        x0, start = h, list(caches)
        h, caches = model.run_blocks(model.core_idx, h, caches, ctx)
        y, caches = model.run_blocks(model.coda_idx, h, caches, ctx)
        out.append(model.head(y))
        if e < T:
            wake = list(caches)
            for _ in range(2, passes + 1):
                restarted = list(caches)
                for i in model.core_idx:  # S carried, short-term memory back to the window's start
                    restarted[i] = caches[i].with_short_term(start[i])
                h, caches = model.run_blocks(model.core_idx, feed(h, x0), restarted, ctx)
            caches = [c.with_short_term(wake[i]) if i in model.core_idx else c for i, c in enumerate(caches)]
            caches = [c.evict("hard", L) for c in caches]
    return torch.cat(out, 1)


def rand_ids(model, T, seed=3):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def rms(x):
    return x.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()


@pytest.mark.parametrize("passes", [1, 3])
def test_defaults_are_the_papers_loop_bit_for_bit(passes):
    model = tiny_model("AGMA", n_prelude=1)
    ids = rand_ids(model, 17)
    with torch.no_grad():
        ref = reference_loop(model, ids, 5, passes)
        got = sleep_forward(model, ids, SleepConfig(window=5, passes=passes), return_logits=True).logits
        off = sleep_forward(model, ids, SleepConfig(window=5, passes=passes, reinject=False, feedback_norm=False,
                                                    truncate_mode="detach"), return_logits=True).logits
    assert torch.equal(got, ref) and torch.equal(off, ref)


@pytest.mark.parametrize("switch, feed", [
    ("reinject", lambda h, x0: h + x0),
    ("feedback_norm", lambda h, x0: h * rms(x0) / rms(h)),
])
def test_feedback_switches_change_what_enters_a_sleep_pass(switch, feed):
    model = tiny_model("AGMA", n_prelude=1)
    ids = rand_ids(model, 17)
    cfg = SleepConfig(window=5, passes=3, **{switch: True})
    with torch.no_grad():
        got = sleep_forward(model, ids, cfg, return_logits=True).logits
        want = reference_loop(model, ids, 5, 3, feed)
        plain = reference_loop(model, ids, 5, 3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[:, 5:] - plain[:, 5:]).abs().max() > 1e-6  # windows after the first sleep change
    torch.testing.assert_close(got[:, :5], plain[:, :5], rtol=0, atol=0)  # the first window's wake does not


def test_both_feedback_switches_reinject_then_normalise():
    model = tiny_model("AGMA")
    ids = rand_ids(model, 15)
    with torch.no_grad():
        got = sleep_forward(model, ids, SleepConfig(window=5, passes=2, reinject=True, feedback_norm=True),
                            return_logits=True).logits
        want = reference_loop(model, ids, 5, 2, lambda h, x0: (h + x0) * rms(x0) / rms(h + x0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def window1_embedding_grad(mode: str | None, k: int | None, passes: int = 3):
    model = tiny_model("AGMA", vocab=40, tie_embeddings=False)
    L, T = 5, 15
    ids = torch.randint(20, 40, (2, T), generator=torch.Generator().manual_seed(0))
    ids[:, :L] = torch.randint(0, 20, (2, L), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 2 * L + 1:] = True  # loss only on window-3 targets: window 1 reaches them through S alone
    extra = {} if mode is None else {"truncate_mode": mode}
    out = sleep_forward(model, ids, SleepConfig(window=L, passes=passes, truncate_backprop=k, **extra), loss_mask=mask)
    out.loss.backward()
    return out.loss.detach(), model.embed_tokens.weight.grad[ids[:, :L].unique()].abs().sum()


def test_truncate_detach_cuts_the_tokens_path_and_straight_through_keeps_it():
    loss_full, g_full = window1_embedding_grad(None, None)
    loss_cut, g_cut = window1_embedding_grad("detach", 0)
    loss_st, g_st = window1_embedding_grad("straight_through", 0)
    assert g_full > 0
    assert g_cut == 0, "detach: no gradient from later windows reaches window 1's tokens"
    assert g_st > 0, "straight_through: window 1's tokens still get gradient through S"
    # forward values unchanged: exactly for detach; straight-through computes x + (f(x) - x), equal to f(x)
    # up to one rounding per pass
    assert torch.equal(loss_full, loss_cut)
    torch.testing.assert_close(loss_st, loss_full, rtol=1e-12, atol=0)


def test_reinject_without_core_input_is_a_clear_error():
    from megasleep.sleep import SleepRunner

    model = tiny_model("AGMA")
    runner = SleepRunner(model, SleepConfig(window=5, passes=2, reinject=True))
    h = torch.zeros(1, 5, model.config.d_model, dtype=torch.float64)
    with pytest.raises(ValueError, match="core input"):
        runner.feed_back(h, None)
