"""GSM-Infinite answer extraction and AUC, bootstrap intervals, scored units."""

from __future__ import annotations

import numpy as np
import pytest

from megasleep.eval.scoring import (
    bootstrap_ci,
    extract_integer_answer,
    gsm_auc,
    gsm_score_generation,
    sample_units,
)


@pytest.mark.parametrize("text, want", [
    ("Answer: 42.", 42),
    ("answer: 7", 7),                                   # no end marker: to the end of the reply
    ("so the ANSWER: 13. done", 13),                    # lower-cased first
    ("Answer: many. Solution: 5.", 5),                  # first keyword's span is not an integer: next keyword
    ("we get \\boxed{128} in the end", 128),
    ("the total is 9.", 9),                             # "is " is searched from the right
    ("it is 3 and then it is 11.", 11),
    ("**Answer:** 64.", 64),                            # "answer: " is absent ("answer:**"): the bold keyword
    ("**Answer: 17**", 17),                             # "answer: " span "17**" is no integer; "**answer: " is
    ("Answer: -4.", -4),
    ("nothing here", None),
    ("Answer: 1,000.", None),
])
def test_extract_integer_answer(text, want):
    assert extract_integer_answer(text) == want


def test_score_generation_puts_the_cue_back():
    assert gsm_score_generation("42", 42) == (True, 42)
    assert gsm_score_generation(" 42", "42") == (True, 42)
    assert gsm_score_generation("421", 42) == (False, 421)   # an extra digit is a wrong answer
    assert gsm_score_generation("4 2", 42) == (False, None)
    assert gsm_score_generation("17\nQuestion: what", 17) == (True, 17)


def test_gsm_auc_is_trapezoid_times_100():
    assert gsm_auc([1, 2, 3], [1.0, 0.5, 0.0]) == pytest.approx(100 * (0.75 + 0.25))
    assert gsm_auc([3, 1, 2], [0.0, 1.0, 0.5]) == pytest.approx(100.0)     # sorted by ops first
    assert gsm_auc([2, 4], [0.5, 0.5]) == pytest.approx(100.0)
    assert gsm_auc([5], [1.0]) == 0.0


def test_bootstrap_ci():
    rng = np.random.default_rng(0)
    c = rng.random(400) < 0.3
    acc, lo, hi = bootstrap_ci(c, n_boot=2000, seed=1)
    assert acc == pytest.approx(c.mean()) and lo < acc < hi
    se = np.sqrt(acc * (1 - acc) / 400)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)          # close to the normal interval
    assert bootstrap_ci(c, n_boot=500, seed=1) == bootstrap_ci(c, n_boot=500, seed=1)
    # samples with 10 perfectly correlated units: the interval is that of 40 samples, not 400 units
    c10 = np.repeat(c[:40], 1) * 10
    a2, lo2, hi2 = bootstrap_ci(c10, np.full(40, 10), n_boot=2000, seed=1)
    assert a2 == pytest.approx(c[:40].mean()) and hi2 - lo2 > 2 * (hi - lo)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    assert all(np.isnan(bootstrap_ci([])))


def test_sample_units():
    assert sample_units({"answer_positions": [5, 6, 7, 8]}) == [[5, 6, 7, 8]]
    meta = {"answer_positions": [4, 5, 10, 11], "queries": [{"positions": [4, 5]}, {"positions": [10, 11]}]}
    assert sample_units(meta) == [[4, 5], [10, 11]]
    assert sample_units({"answer_positions": []}) == []
