"""generate / generate_stream: batches of prompts of different lengths, sampling options, eos, seed,
streaming; and the bad inputs that must fail with a clear message."""

from __future__ import annotations

import types

import pytest
import torch

from megasleep.inference import Session, filter_logits, generate, generate_stream, sample_next
from megasleep.sleep import SleepConfig, sleep_forward
from tests.conftest import tiny_model

pytestmark = pytest.mark.usefixtures("no_grad")

PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9], [7, 7, 1, 30], [11, 12, 13, 14, 15, 16, 17, 18, 19]]


@pytest.fixture(scope="module")
def model():
    return tiny_model("MAGMA", n_prelude=1, n_coda=1)


def greedy_reference(model, prompt, n, cfg):
    """Greedy decoding by re-running the chunked sleep forward over the whole sequence each token."""
    seq = list(prompt)
    for _ in range(n):
        logits = sleep_forward(model, torch.tensor([seq]), cfg, return_logits=True).logits[0, -1]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_greedy_batch_of_ragged_prompts_equals_recomputing_the_chunked_forward(model, eviction):
    cfg = SleepConfig(window=4, passes=2, eviction=eviction)
    res = generate(model, PROMPTS, 7, sleep=cfg, temperature=0)
    assert res.tokens == [greedy_reference(model, p, 7, cfg) for p in PROMPTS]
    # one session per prompt length (rows of a session share positions); same-length prompts batched
    assert res.stats.sessions == 3
    assert res.stats.generated_tokens == 28 and res.stats.prompt_tokens == sum(map(len, PROMPTS))
    # tokens fed per session = prompt + 6 decode steps; one sleep per filled window, N passes each
    assert res.stats.sleeps == sum((n + 6) // 4 for n in {len(p) for p in PROMPTS})
    assert res.stats.passes_used == [2] * res.stats.sleeps
    assert res.stats.decode_tokens == 4 * 6


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(model):
    kw = dict(window=4, passes=3, temperature=1.0, seed=123)
    a = generate(model, PROMPTS, 10, **kw).tokens
    assert a == generate(model, PROMPTS, 10, **kw).tokens
    assert generate(model, PROMPTS[:1], 10, **kw).tokens[0] == a[0]   # same prompt index, alone
    b = generate(model, PROMPTS, 10, **{**kw, "seed": 124}).tokens
    assert a != b
    # a row-dependent seed: two identical prompts still get different samples
    c = generate(model, [PROMPTS[0], PROMPTS[0]], 10, **kw).tokens
    assert c[0] == a[0] and c[1] != c[0]


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    greedy = generate(model, PROMPTS, 6, window=4, passes=2, temperature=0).tokens
    assert generate(model, PROMPTS, 6, window=4, passes=2, temperature=1.3, top_k=1, seed=0).tokens == greedy
    assert generate(model, PROMPTS, 6, window=4, passes=2, temperature=1.3, top_p=1e-9, seed=0).tokens == greedy


def test_filter_logits_top_k_top_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    lg = probs.log()
    keep = lambda x: torch.isfinite(x).nonzero().flatten().tolist()  # noqa: E731
    assert keep(filter_logits(lg, top_k=2)) == [1, 3]
    assert keep(filter_logits(lg, top_p=0.8)) == [1, 3]          # 0.5 + 0.3 reaches 0.8
    assert keep(filter_logits(lg, top_p=0.81)) == [1, 2, 3]
    assert keep(filter_logits(lg, top_p=0.01)) == [1]
    assert keep(filter_logits(lg, top_k=3, top_p=0.6)) == [1, 3]
    # sampled frequencies follow the renormalised distribution
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(lg, 1.0, top_k=2, generator=g) for _ in range(3000)]
    assert set(draws) == {1, 3}
    assert abs(draws.count(1) / 3000 - 0.5 / 0.8) < 0.03
    hot = [sample_next(lg, 100.0, generator=g) for _ in range(2000)]  # high temperature flattens
    assert all(abs(hot.count(i) / 2000 - 0.25) < 0.04 for i in range(4))


def test_eos_stops_each_prompt_and_is_emitted(model):
    greedy = generate(model, PROMPTS, 8, window=4, passes=2, temperature=0).tokens
    eos = greedy[1][2]
    res = generate(model, PROMPTS, 8, window=4, passes=2, temperature=0, eos_id=eos)
    for full, got in zip(greedy, res.tokens):
        expect = full[:full.index(eos) + 1] if eos in full else full
        assert got == expect
    assert len(res.tokens[1]) == greedy[1].index(eos) + 1 < 8


def test_streaming_yields_tokens_as_they_come(model):
    stream = generate_stream(model, PROMPTS, 5, window=4, passes=2, temperature=0.7, seed=1)
    assert isinstance(stream.__next__, types.MethodType)
    first = next(stream)
    assert first.index == 0 and stream.stats.generated_tokens == 1 and stream.stats.decode_tokens == 0
    events = [first, *stream]
    by_prompt = {}
    for ev in events:
        by_prompt.setdefault(ev.prompt, []).append(ev)
    assert [[e.token for e in by_prompt[i]] for i in range(4)] == \
        generate(model, PROMPTS, 5, window=4, passes=2, temperature=0.7, seed=1).tokens
    for evs in by_prompt.values():
        assert [e.index for e in evs] == list(range(5))
        assert [e.finished for e in evs] == [False] * 4 + [True]


def test_adaptive_generation_reports_passes(model):
    res = generate(model, [list(range(1, 30))], 3, window=4, passes=5, adaptive_tol=10.0, temperature=0)
    assert res.stats.passes_used and set(res.stats.passes_used) == {2}


# ---- bad input ----------------------------------------------------------------------------------
def test_empty_prompts_are_errors(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []], 3, window=4)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], 3, window=4)
    with pytest.raises(ValueError, match="empty prompt"):
        Session(model, window=4).feed([])
    with pytest.raises(ValueError, match="empty prompt"):
        Session(model, window=4, batch=2).feed(torch.zeros(2, 0, dtype=torch.long))


def test_out_of_range_ids_are_errors(model):
    with pytest.raises(ValueError, match=r"prompt 0: token ids must be integers in \[0, 61\).*61"):
        generate(model, [[1, 61]], 3, window=4)
    with pytest.raises(ValueError, match=r"\[0, 61\).*-1"):
        generate(model, [[1, 2], [-1]], 3, window=4)
    s = Session(model, window=4)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\)"):
        s.feed([[3, 99]])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\)"):
        s.step([61])
    assert s.position == 0                     # nothing was consumed by the failed calls
    with pytest.raises(ValueError, match="integers"):
        s.feed(torch.tensor([[0.5]]))


def test_bad_sleep_settings_are_errors(model):
    with pytest.raises(ValueError, match="passes N must be >= 1"):
        Session(model, window=4, passes=0)
    with pytest.raises(ValueError, match="passes N must be >= 1"):
        generate(model, [[1]], 2, window=4, passes=-1)
    with pytest.raises(ValueError, match="passes"):
        Session(model, SleepConfig(window=4, passes=0))  # pydantic's own check (a ValueError)
    with pytest.raises(ValueError, match="window L must be >= 1"):
        Session(model, window=0)
    with pytest.raises(ValueError, match="eviction"):
        Session(model, window=4, eviction="soft")
    with pytest.raises(ValueError, match="temperature"):
        generate(model, [[1]], 2, window=4, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 2, window=4, top_p=0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, [[1]], 2, window=4, top_k=0)


def test_bad_call_shapes_are_errors(model):
    s = Session(model, window=4, batch=2)
    with pytest.raises(ValueError, match="serves 2 sequence"):
        s.feed(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="one token per sequence"):
        s.step(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits must be one of"):
        s.feed(torch.zeros(2, 2, dtype=torch.long), logits="first")
