"""Streaming engine == chunked sleep forward (docs/inference.md), for any mix of prefill and step.

fp64 random models of every mixer type and prelude/core/coda split; L in {4, 7, 16}, N in {1, 2, 3},
hard and sliding eviction, prompts whose length is and is not a multiple of L. The full product of
(L, N, eviction, multiple-or-not) runs with a random prefill/step schedule (the pattern rotates through
all seven models); every model also runs pure-step and pure-prefill schedules.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from megasleep.inference import Session
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")

# (pattern, n_prelude, n_coda): each mixer alone, hybrids, attention / SSM in prelude and coda
MODELS = [("A", 0, 0), ("G", 0, 0), ("M", 0, 0), ("AGMA", 0, 0), ("MAGMA", 1, 1), ("AGMG", 1, 1), ("GAMGA", 0, 2)]
TOL = dict(rtol=1e-10, atol=1e-11)


def rand_ids(vocab, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def schedule(kind: str, T: int, L: int, seed: int) -> list[int]:
    """Piece lengths: 1 = step, >1 = prefill (crossing window boundaries, starting mid-window, ...)."""
    if kind == "step":
        return [1] * T
    if kind == "prefill":
        return [T]
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 1, 2, L - 1, L, L + 1, 2 * L + 3]
    out, left = [], T
    while left:
        n = min(left, sizes[int(torch.randint(len(sizes), (1,), generator=g))])
        out.append(n)
        left -= n
    return out


def run_engine(model, ids, cfg, pieces):
    sess = Session(model, cfg, batch=ids.shape[0])
    out, s = [], 0
    for n in pieces:
        if n == 1 and s % 2 == 0:
            out.append(sess.step(ids[:, s])[:, None])          # step() API with [B] ids
        else:
            out.append(sess.feed(ids[:, s:s + n]))            # feed() (T == 1 here takes the step path too)
        s += n
    assert sess.position == ids.shape[1]
    return torch.cat(out, 1), sess


def check(model_spec, L, N, eviction, multiple, kind, seed):
    pattern, pre, coda = model_spec
    model = tiny_model(pattern, n_prelude=pre, n_coda=coda, seed=seed)
    T = 3 * L if multiple else 3 * L + 1 + seed % (L - 1)
    ids = rand_ids(model.config.vocab_size, 2, T, seed)
    cfg = SleepConfig(window=L, passes=N, eviction=eviction)
    ref = sleep_forward(model, ids, cfg, return_logits=True).logits
    got, sess = run_engine(model, ids, cfg, schedule(kind, T, L, seed))
    torch.testing.assert_close(got, ref, **TOL)
    # the engine slept once per filled window (the chunked forward skips only the last, logit-free sleep)
    assert sess.sleeps == (T // L if N > 1 else 0)
    assert [r.passes_used for r in sess.sleep_log] == [N] * (T // L)
    return model, ids, ref


CASES = list(itertools.product([4, 7, 16], [1, 2, 3], ["hard", "sliding"], [True, False]))


@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"L{L}-N{N}-{e}-{'mult' if m else 'ragged'}" for L, N, e, m in CASES])
def test_mixed_schedule_matches_chunked_forward(case):
    L, N, eviction, multiple = CASES[case]
    check(MODELS[case % len(MODELS)], L, N, eviction, multiple, "mixed", seed=case)


@pytest.mark.parametrize("kind", ["step", "prefill"])
@pytest.mark.parametrize("model_spec", MODELS, ids=lambda m: f"{m[0]}-{m[1]}-{m[2]}")
def test_pure_step_and_pure_prefill(model_spec, kind):
    for L, N, eviction, multiple in ((7, 3, "sliding", False), (4, 2, "hard", True)):
        check(model_spec, L, N, eviction, multiple, kind, seed=len(model_spec[0]) + L)


def test_reference_is_sensitive_to_passes_and_eviction():
    """Guards against a vacuous parity test: N and the eviction mode do change the logits here."""
    model = tiny_model("MAGMA", n_prelude=1, n_coda=1)
    ids = rand_ids(61, 2, 20, 0)
    lg = {(n, e): sleep_forward(model, ids, SleepConfig(window=4, passes=n, eviction=e), return_logits=True).logits
          for n in (1, 3) for e in ("hard", "sliding")}
    assert (lg[1, "hard"] - lg[3, "hard"])[:, 4:].abs().amin(-1).max() > 1e-6
    assert (lg[1, "hard"] - lg[1, "sliding"])[:, 4:].abs().max() > 1e-6
    assert (lg[1, "hard"] - lg[3, "hard"])[:, :4].abs().max() == 0          # first window: no sleep yet


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_adaptive_sleep_matches_and_reports_passes(eviction):
    model = tiny_model("AGMA", n_prelude=0)
    L, T = 5, 18
    ids = rand_ids(61, 2, T, 3)
    for tol, expect in ((10.0, 2), (1e-300, 5)):
        cfg = SleepConfig(window=L, passes=5, eviction=eviction, adaptive_tol=tol)
        ref = sleep_forward(model, ids, cfg, return_logits=True)
        got, sess = run_engine(model, ids, cfg, schedule("mixed", T, L, 7))
        torch.testing.assert_close(got, ref.logits, **TOL)
        used = [r.passes_used for r in sess.sleep_log]
        assert used == ref.passes_used[:-1] == [expect] * (T // L)
        assert sess.sleep_passes == sum(used)
    # a mid tolerance: passes vary per window and still agree with the chunked forward
    cfg = SleepConfig(window=L, passes=5, eviction=eviction, adaptive_tol=0.05)
    ref = sleep_forward(model, ids, cfg, return_logits=True)
    got, sess = run_engine(model, ids, cfg, schedule("step", T, L, 0))
    torch.testing.assert_close(got, ref.logits, **TOL)
    assert [r.passes_used for r in sess.sleep_log] == ref.passes_used[:-1]


def test_logits_modes_and_state_equal_to_chunked_forward():
    model = tiny_model("MAGMA", n_prelude=1, n_coda=1)
    ids = rand_ids(61, 2, 19, 5)
    cfg = SleepConfig(window=4, passes=2, eviction="sliding")
    full = Session(model, cfg, batch=2).feed(ids)
    last = Session(model, cfg, batch=2).feed(ids, logits="last")
    torch.testing.assert_close(last, full[:, -1], **TOL)
    s = Session(model, cfg, batch=2)
    assert s.feed(ids[:, :10], logits="none") is None
    torch.testing.assert_close(s.feed(ids[:, 10:]), full[:, 10:], **TOL)
    # the fast weights after a boundary equal the chunked forward's over the same whole windows
    ref = sleep_forward(model, ids[:, :17], cfg).caches   # windows 1-4 sleep, window 5 is 1 token
    sess = Session(model, cfg, batch=2)
    sess.feed(ids[:, :17], logits="none")
    for a, b in zip(sess.caches, ref):
        if a.ssm is not None:
            torch.testing.assert_close(a.ssm, b.ssm, **TOL)


def test_select_rows_keeps_the_others_exact():
    model = tiny_model("AGMA")
    ids = rand_ids(61, 3, 14, 9)
    cfg = SleepConfig(window=4, passes=3)
    ref = sleep_forward(model, ids, cfg, return_logits=True).logits
    s = Session(model, cfg, batch=3)
    s.feed(ids[:, :6])
    s.select([2, 0])
    got = s.feed(ids[[2, 0], 6:])
    torch.testing.assert_close(got, ref[[2, 0], 6:], **TOL)


def test_wake_steps_use_the_recurrent_step_ops(monkeypatch):
    """A wake step runs the single-token ops (ssd_step / gdn_step / causal_conv1d_step, which dispatch
    to the CUDA step kernels); the chunked ops run only inside sleep passes — also for the first token
    after a hard eviction."""
    import megasleep.models.gdn as gdn_mod
    import megasleep.models.mamba2 as m2_mod

    calls: dict[str, int] = {}

    def counting(mod, name):
        fn = getattr(mod, name)

        def wrapped(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)

    for mod, names in ((m2_mod, ["ssd", "ssd_step", "causal_conv1d", "causal_conv1d_step"]),
                       (gdn_mod, ["gated_delta_rule", "gdn_step", "causal_conv1d", "causal_conv1d_step"])):
        for n in names:
            counting(mod, n)
    model = tiny_model("AGMA")          # one gdn + one mamba2 layer, all in the core
    L, N = 4, 3
    s = Session(model, window=L, passes=N, eviction="hard", batch=2)
    ids = rand_ids(61, 2, 3 * L, 1)
    for t in range(3 * L):
        s.step(ids[:, t])
    assert calls.get("ssd_step") == 3 * L and calls.get("gdn_step") == 3 * L
    # mamba2 has one conv per step, gdn three (q, k, v); the same module object is patched twice
    assert calls.get("causal_conv1d_step") == 3 * L * 4
    # chunked ops: only the sleep passes (N-1 per window, 3 windows filled)
    assert calls.get("ssd") == 3 * (N - 1) and calls.get("gated_delta_rule") == 3 * (N - 1)
    assert calls.get("causal_conv1d") == 3 * (N - 1) * 4


def test_fork_and_state_dict_round_trip():
    import io

    model = tiny_model("MAGMA", n_prelude=1, n_coda=1)
    cfg = SleepConfig(window=4, passes=3, eviction="sliding")
    a_ids, b_ids = rand_ids(61, 2, 15, 1), rand_ids(61, 2, 15, 2)
    b_ids[:, :6] = a_ids[:, :6]                                  # shared first 6 tokens, then they differ
    ref_a = sleep_forward(model, a_ids, cfg, return_logits=True).logits
    ref_b = sleep_forward(model, b_ids, cfg, return_logits=True).logits
    s = Session(model, cfg, batch=2)
    s.feed(a_ids[:, :6])
    t = s.fork()
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    torch.testing.assert_close(s.feed(a_ids[:, 6:]), ref_a[:, 6:], **TOL)
    torch.testing.assert_close(t.feed(b_ids[:, 6:]), ref_b[:, 6:], **TOL)
    buf.seek(0)
    u = Session(model, cfg, batch=2).load_state_dict(torch.load(buf))
    assert u.position == 6
    torch.testing.assert_close(u.feed(b_ids[:, 6:]), ref_b[:, 6:], **TOL)
    with pytest.raises(ValueError, match="state is for"):
        Session(model, window=5, passes=3, eviction="sliding", batch=2).load_state_dict(s.state_dict())


REMEDIES = [dict(reinject=True), dict(feedback_norm=True), dict(reinject=True, feedback_norm=True)]


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("remedy", REMEDIES, ids=lambda r: "+".join(r))
def test_sleep_remedies_stream_like_the_chunked_forward(remedy, eviction):
    """A model trained with reinject / feedback_norm (they feed the window's core input into every sleep
    pass) streams exactly as the one-shot forward computes it, with a prelude (core input = the prelude's
    output) and without one (= the embeddings), through steps, prefills and a state round trip."""
    for seed, (pattern, pre, coda) in enumerate([("MAGMA", 1, 1), ("AGMG", 0, 1)]):
        model = tiny_model(pattern, n_prelude=pre, n_coda=coda, seed=seed)
        L, T = 5, 17
        ids = rand_ids(model.config.vocab_size, 2, T, seed)
        cfg = SleepConfig(window=L, passes=3, eviction=eviction, **remedy)
        ref = sleep_forward(model, ids, cfg, return_logits=True).logits
        plain = sleep_forward(model, ids, cfg.model_copy(update=dict(reinject=False, feedback_norm=False)),
                              return_logits=True).logits
        assert (ref - plain)[:, L:].abs().max() > 1e-6  # the remedy changes the logits: not a vacuous check
        got, sess = run_engine(model, ids, cfg, schedule("mixed", T, L, seed))
        torch.testing.assert_close(got, ref, **TOL)
        assert "window_core_input" in sess.held_tensors()
        # a session restored mid-window carries the core input of the part of the window it has seen
        half = Session(model, cfg, batch=2)
        half.feed(ids[:, :7])
        resumed = Session(model, cfg, batch=2).load_state_dict(half.state_dict())
        torch.testing.assert_close(resumed.feed(ids[:, 7:]), ref[:, 7:], **TOL)
    with pytest.raises(ValueError, match="reinject / sleep.feedback_norm"):
        Session(model, SleepConfig(window=L, passes=3, eviction=eviction), batch=2).load_state_dict(sess.state_dict())
