"""Pointer: follow ``k`` arrows around a random directed cycle that has been evicted (docs/tasks.md).

Layout (defaults: T = 36 + 4 = 40, i.e. one window of L = 36 and a 4-token query)::

    <pad> ... <pad> | a -> b | c -> d | ...        (one edge per 3 tokens, in random order)
    <hk> s <ans> r

The graph is a random directed cycle over ``n ~ U[n_min, n_max]`` nodes with distinct single-token
names drawn from ``A..Z``; each edge ``a -> b`` is three tokens (the arrow is a token of its own) and
the edge block is left-padded with the tokenizer's pad id to ``graph_len`` tokens. With the window
``L = graph_len`` and hard eviction the whole graph is evicted before the query, so the answer can only
come from the SSM fast weights. The query names the hop count ``k`` (token ``<hk>``), a start node
``s`` and the node ``r`` reached after ``k`` steps along the cycle; loss on ``r`` only.

Why this task separates depths (worked out in docs/tasks.md): an AG model awake has one fast-weight
read at query time and its wake pass writes only 1-hop links, so k = 2 sits at a guessing ceiling;
the second pass can compose the links whose successor edge came earlier in the list (about half),
the third pass all of them.
"""

from __future__ import annotations

import string

import numpy as np

from megasleep.data.sample import make_sample as _make

NAME = "pointer"
VERSION = "1"
DIFFICULTY = "k"
MAX_HOPS = 8  # hop tokens <h1>..<h8> exist in every pointer tokenizer
NAMES = tuple(string.ascii_uppercase)  # single-token node names
ARROW = "->"
SYMBOLS = (*NAMES, ARROW, "<ans>", *(f"<h{k}>" for k in range(1, MAX_HOPS + 1)))
DEFAULTS = {"n_min": 8, "n_max": 12, "graph_len": 36}
EDGE_TOKENS = 3


def check_params(k: int, n_min: int, n_max: int, graph_len: int) -> None:
    if not 1 <= k <= MAX_HOPS:
        raise ValueError(f"pointer: k must be in [1, {MAX_HOPS}], got {k}")
    if not 2 <= n_min <= n_max <= len(NAMES):
        raise ValueError(f"pointer: need 2 <= n_min <= n_max <= {len(NAMES)} (got n_min={n_min}, n_max={n_max})")
    if EDGE_TOKENS * n_max > graph_len:
        raise ValueError(f"pointer: {n_max} edges of {EDGE_TOKENS} tokens do not fit in graph_len={graph_len}")
    back = [n for n in range(n_min, n_max + 1) if k % n == 0]
    if back:
        raise ValueError(f"pointer: k={k} hops around a {back[0]}-cycle return to the start node; "
                         f"use k < n_min={n_min}")


def make_sample(rng: np.random.Generator, difficulty: int, tokenizer, n_min: int = 8, n_max: int = 12,
                graph_len: int = 36) -> dict:
    k = int(difficulty)
    check_params(k, n_min, n_max, graph_len)
    n = int(rng.integers(n_min, n_max + 1))
    names = rng.choice(len(NAMES), size=n, replace=False)  # node j is called NAMES[names[j]]
    cycle = rng.permutation(n)  # cycle[i] -> cycle[i+1]
    succ = np.empty(n, dtype=np.int64)
    succ[cycle] = np.roll(cycle, -1)
    tid = tokenizer.piece_to_id
    node_tok = [tid(NAMES[int(j)]) for j in names]
    arrow = tid(ARROW)
    edges: list[int] = []
    for src in rng.permutation(n):  # edges in random order
        edges += [node_tok[int(src)], arrow, node_tok[int(succ[src])]]
    ids = [tokenizer.pad_id] * (graph_len - len(edges)) + edges
    start = int(rng.integers(n))
    node = start
    for _ in range(k):
        node = int(succ[node])
    ids += [tid(f"<h{k}>"), node_tok[start], tid("<ans>"), node_tok[node]]
    answer_pos = len(ids) - 1
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[answer_pos] = 1
    meta = {
        "task": NAME,
        "difficulty": k,
        "answer": NAMES[int(names[node])],
        "answer_positions": [answer_pos],
        "start": NAMES[int(names[start])],
        "n_nodes": n,
        "graph_len": graph_len,
    }
    return _make(ids, mask, meta)


def guess_ceiling(k: int, n_min: int = 8, n_max: int = 12) -> float:
    """Accuracy of a model that knows only the start's own edges (its successor and predecessor) and
    guesses uniformly among the other nodes: 1 for k = 1, else the mean of 1/(n-3) over n."""
    if k == 1:
        return 1.0
    return float(np.mean([1.0 / (n - 3) for n in range(n_min, n_max + 1)]))


def make_task_tokenizer(out_dir, **_params):
    from pathlib import Path

    from megasleep.data.tokenizer import train_symbol_tokenizer

    return train_symbol_tokenizer(SYMBOLS, Path(out_dir) / f"{NAME}.model")
