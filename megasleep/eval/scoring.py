"""Scoring helpers: GSM-Infinite answer extraction and AUC, exact-match units, and the two intervals
every accuracy carries (Wilson over units, bootstrap over samples).

GSM scoring follows the GSM-Infinite benchmark's realistic-set evaluation (Infini-AI-Lab/gsm_infinite,
``pred/eval_realistic.py: criteriaoutput`` for the integer extraction, and ``app.py: calculate_auc`` for
the area under the accuracy-vs-ops curve: trapezoidal rule over the sorted op counts, times 100).
Read in the public fork voicetreelab/gsm_infinite (gsm-infinite/pred/eval_realistic.py,
gsm-infinite/app.py); reimplemented here, not copied.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

# GSM-Infinite's keyword table: (start keyword, end marker). "oxed{" and "is " are searched from the
# right (the last occurrence), the others from the left; None = the run of digits after the keyword.
GSM_KEYWORDS: tuple[tuple[str, str | None], ...] = (
    ("answer: ", "."),
    ("solution: ", "."),
    ("oxed{", "}"),
    ("**answer:** ", "."),
    ("**answer: ", "**"),
    ("final answer: answer: ", "."),
    ("\nanswer: ", "."),
    ("\\text{answer: } ", None),
    ("is ", "."),
    ("answer: ", "\n"),
)


def _is_integer(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def extract_integer_answer(text: str) -> int | None:
    """The integer answer in a reply, as GSM-Infinite's realistic-set scorer finds it, or None.

    The reply is lower-cased (after GSM-Infinite's backspace clean-up); the keywords are tried in
    order and the first whose span parses as an integer wins. (The reference reads the digit run of
    the ``\\text{answer: }`` case from the first reply and can run past the end of the string; here it
    reads the reply itself and stops at its end.)
    """
    text = re.sub(".\x08", "b", text).lower()
    for kw, end in GSM_KEYWORDS:
        begin = text.rfind(kw) if kw in ("oxed{", "is ") else text.find(kw)
        if begin == -1:
            continue
        start = begin + len(kw)
        if end is None:
            stop = start
            while stop < len(text) and text[stop].isdigit():
                stop += 1
        else:
            stop = text.find(end, start)
            if stop == -1:
                stop = len(text)
        candidate = text[start:stop]
        if _is_integer(candidate):
            return int(candidate)
    return None


def gsm_score_generation(generated: str, answer: int | str, prompt_cue: str = "Answer: ") -> tuple[bool, int | None]:
    """(correct, extracted) for a continuation generated after the sample's ``Answer:`` cue.

    Our GSM layout ends the prompt with ``Answer:`` and the model produces only the integer (no chain
    of thought), so the cue is put back in front of the continuation before extraction: the reply the
    GSM-Infinite scorer sees is ``"Answer: <continuation>"``."""
    got = extract_integer_answer(prompt_cue + generated.strip())
    try:
        want = int(str(answer).strip())
    except ValueError:
        return False, got
    return got is not None and got == want, got


def gsm_auc(ops: Sequence[float], accuracy: Sequence[float]) -> float:
    """Area under accuracy (0..1) vs number of operations, trapezoidal, times 100 (GSM-Infinite's
    leaderboard AUC). Fewer than two points give 0, as in the reference."""
    if len(ops) < 2:
        return 0.0
    pairs = sorted(zip((float(o) for o in ops), (float(a) for a in accuracy)))
    x = np.array([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) * 100.0)


def bootstrap_ci(correct: Sequence[float], units: Sequence[float] | None = None, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(accuracy, low, high): percentile bootstrap over *samples* (a sample with several scored units,
    e.g. Depo's 10 queries, is resampled as a whole, so correlated units do not shrink the interval).

    ``correct[i]``: units of sample i answered correctly; ``units[i]``: units scored in sample i
    (default 1 each). Accuracy = sum(correct) / sum(units)."""
    c = np.asarray(correct, dtype=np.float64)
    u = np.ones_like(c) if units is None else np.asarray(units, dtype=np.float64)
    n = c.size
    if n == 0 or u.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    acc = float(c.sum() / u.sum())
    if n_boot <= 0 or n == 1:
        return acc, acc, acc
    rng = np.random.default_rng(seed)
    accs = np.empty(n_boot)
    step = max(1, min(n_boot, 2_000_000 // n))  # bound the index matrix to ~16 MB
    for s in range(0, n_boot, step):
        k = min(step, n_boot - s)
        idx = rng.integers(0, n, size=(k, n))
        den = u[idx].sum(1)
        accs[s:s + k] = np.where(den > 0, c[idx].sum(1) / np.maximum(den, 1e-12), np.nan)
    lo, hi = np.nanpercentile(accs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return acc, float(lo), float(hi)


Z95 = 1.959964


def wilson(correct: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / n`` (0, 1 when n = 0)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def chance_level(task: str | None, samples: list[dict]) -> float | None:
    """Exact-match accuracy of uniform guessing per unit, where the task fixes it: Rule 110, one bit
    per label (2^-labels); Depo, a 2-letter node name (1/26^2). None for other data."""
    if not samples:
        return None
    units = sample_units(samples[0]["meta"])
    if task == "rule110" and units:
        return 0.5 ** len(units[0])
    if task == "depo":
        from megasleep.data.tasks.depo import LETTERS

        return 1.0 / len(LETTERS) ** 2
    return None


def sample_units(meta: dict) -> list[list[int]]:
    """The scored units of a sample as lists of answer positions: one unit per ``meta.queries`` entry
    (Depo: each query's 2 answer tokens) or the whole answer (Rule 110's 4 labels, GSM's integer)."""
    queries = meta.get("queries")
    if isinstance(queries, list) and queries and all(isinstance(q, dict) and q.get("positions") for q in queries):
        return [list(map(int, q["positions"])) for q in queries]
    pos = [int(p) for p in meta.get("answer_positions") or []]
    return [pos] if pos else []


__all__ = ["GSM_KEYWORDS", "Z95", "bootstrap_ci", "chance_level", "extract_integer_answer", "gsm_auc", "gsm_score_generation",
           "sample_units", "wilson"]
