"""Depo (docs/tasks.md): k-hop retrieval over a random directed cycle; depth by hops ``k``.

Layout (defaults: T = 300 + 10*6 = 360)::

    <pad> ... <pad> | a1 a2 b1 b2 | ... (one edge a->b per 4 tokens, edges in random order)
    <hk> s1 s2 <ans> r1 r2   x 10 queries

The graph is a random directed cycle over ``n ~ U[n_min, n_max]`` nodes with distinct 2-token names
(letters ``A..Z`` -> 676 names); its edge block is left-padded with the tokenizer's pad id to
``graph_len`` tokens. Each query names a hop count ``k`` (token ``<hk>``), a start node, and the node
reached after ``k`` steps along the cycle; loss on the 2 answer tokens of every query. All queries of
a sample use the sample's ``k`` (``meta.difficulty``), with distinct start nodes.
"""

from __future__ import annotations

import string

import numpy as np

from megasleep.data.sample import make_sample as _make

NAME = "depo"
VERSION = "1"
DIFFICULTY = "k"
MAX_HOPS = 64  # hop tokens <h1>..<h64> exist in every depo tokenizer
LETTERS = tuple(string.ascii_uppercase)
SYMBOLS = (*LETTERS, "<ans>", *(f"<h{k}>" for k in range(1, MAX_HOPS + 1)))
DEFAULTS = {"n_min": 10, "n_max": 75, "n_queries": 10, "graph_len": 300}


def node_name(i: int) -> tuple[str, str]:
    return LETTERS[i // len(LETTERS)], LETTERS[i % len(LETTERS)]


def make_sample(
    rng: np.random.Generator,
    difficulty: int,
    tokenizer,
    n_min: int = 10,
    n_max: int = 75,
    n_queries: int = 10,
    graph_len: int = 300,
) -> dict:
    k = int(difficulty)
    if not 1 <= k <= MAX_HOPS:
        raise ValueError(f"depo: k must be in [1, {MAX_HOPS}], got {k}")
    if not (n_queries <= n_min <= n_max) or 4 * n_max > graph_len or n_max > len(LETTERS) ** 2:
        raise ValueError(f"depo: need n_queries <= n_min <= n_max, 4*n_max <= graph_len, n_max <= 676 "
                         f"(got {n_queries}, {n_min}, {n_max}, {graph_len})")
    n = int(rng.integers(n_min, n_max + 1))
    names = rng.choice(len(LETTERS) ** 2, size=n, replace=False)  # node j has name names[j]
    cycle = rng.permutation(n)  # cycle[i] -> cycle[i+1]
    succ = np.empty(n, dtype=np.int64)
    succ[cycle] = np.roll(cycle, -1)
    edge_order = rng.permutation(n)  # list edge (cycle[i] -> succ) in random order
    tid = tokenizer.piece_to_id

    def name_tokens(node: int) -> list[int]:
        a, b = node_name(int(names[node]))
        return [tid(a), tid(b)]

    edges: list[int] = []
    for i in edge_order:
        src = int(cycle[i])
        edges += name_tokens(src) + name_tokens(int(succ[src]))
    ids = [tokenizer.pad_id] * (graph_len - len(edges)) + edges
    starts = rng.choice(n, size=n_queries, replace=False)
    hop, ans = tid(f"<h{k}>"), tid("<ans>")
    positions: list[int] = []
    queries = []
    for s in starts:
        node = int(s)
        for _ in range(k):
            node = int(succ[node])
        base = len(ids)
        ids += [hop, *name_tokens(int(s)), ans, *name_tokens(node)]
        positions += [base + 4, base + 5]
        queries.append({"k": k, "start": "".join(node_name(int(names[s]))),
                        "answer": "".join(node_name(int(names[node]))), "positions": [base + 4, base + 5]})
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[positions] = 1
    meta = {
        "task": NAME,
        "difficulty": k,
        "answer": " ".join(q["answer"] for q in queries),
        "answer_positions": positions,
        "n_nodes": n,
        "queries": queries,
        "graph_len": graph_len,
    }
    return _make(ids, mask, meta)


def make_task_tokenizer(out_dir, **_params):
    from pathlib import Path

    from megasleep.data.tokenizer import train_symbol_tokenizer

    return train_symbol_tokenizer(SYMBOLS, Path(out_dir) / f"{NAME}.model")
