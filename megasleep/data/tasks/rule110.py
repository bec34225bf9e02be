"""Rule 110 (docs/tasks.md): depth by rollout steps ``t``.

Layout (defaults: 4 strings of width 24, so T = 4*24 + 1 + 4 = 101)::

    s_1 (24 bit tokens) | s_2 | s_3 | s_4 | <q> | y_1 y_2 y_3 y_4

``y_i`` = bit 0 of string ``s_i`` after ``t`` Rule-110 steps with periodic boundary. With ``L = 24``
each string is alone in its window and is evicted before the query. Loss only on the labels.
Rule 110: new cell = f(left, centre, right) with 111,100,000 -> 0 and the other five -> 1.
"""

from __future__ import annotations

import numpy as np

from megasleep.data.sample import make_sample as _make

NAME = "rule110"
VERSION = "1"
DIFFICULTY = "t"
DEFAULTS = {"n_strings": 4, "width": 24}
SYMBOLS = ("0", "1", "<q>")


def rule110_step(x: np.ndarray) -> np.ndarray:
    """One step on a batch of rows (bool/uint8 [..., W]), periodic boundary."""
    left = np.roll(x, 1, axis=-1)  # left[i] = x[i-1]
    right = np.roll(x, -1, axis=-1)  # right[i] = x[i+1]
    return (x | right) & ~(left & x & right) & 1


def rollout(x: np.ndarray, t: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint8)
    for _ in range(int(t)):
        x = rule110_step(x)
    return x


def rollout_bits(row, t: int) -> list[int]:
    """Fast path used by the generator: one string as a Python int (bit i = cell i), ``t`` steps of
    ``new = (c | r) & ~(l & c & r)`` with cyclic shifts. Same result as :func:`rollout`."""
    w = len(row)
    mask = (1 << w) - 1
    x = 0
    for i, b in enumerate(row):
        x |= int(b) << i
    for _ in range(int(t)):
        left = ((x << 1) | (x >> (w - 1))) & mask  # bit i = cell i-1
        right = ((x >> 1) | (x << (w - 1))) & mask  # bit i = cell i+1
        x = (x | right) & ~(left & x & right) & mask
    return [(x >> i) & 1 for i in range(w)]


def make_sample(rng: np.random.Generator, difficulty: int, tokenizer, n_strings: int = 4, width: int = 24) -> dict:
    t = int(difficulty)
    if t < 0:
        raise ValueError(f"rule110: t must be >= 0, got {t}")
    bits = rng.integers(0, 2, size=(n_strings, width), dtype=np.uint8)
    labels = np.array([rollout_bits(row, t)[0] for row in bits.tolist()], dtype=np.uint8)
    zero, one, q = (tokenizer.piece_to_id(s) for s in SYMBOLS)
    bit_tok = np.array([zero, one], dtype=np.int32)
    ids = np.concatenate([bit_tok[bits.reshape(-1)], [q], bit_tok[labels]]).astype(np.int32)
    mask = np.zeros(ids.size, dtype=np.uint8)
    first = n_strings * width + 1
    positions = list(range(first, first + n_strings))
    mask[positions] = 1
    meta = {
        "task": NAME,
        "difficulty": t,
        "answer": (labels + 48).tobytes().decode("ascii"),
        "answer_positions": positions,
        "strings": [(row + 48).tobytes().decode("ascii") for row in bits],  # 48 = ord("0")
        "n_strings": n_strings,
        "width": width,
    }
    return _make(ids, mask, meta)


def make_task_tokenizer(out_dir, **_params):
    from pathlib import Path

    from megasleep.data.tokenizer import train_symbol_tokenizer

    return train_symbol_tokenizer(SYMBOLS, Path(out_dir) / f"{NAME}.model")
