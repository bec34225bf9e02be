"""The `pointer` task checked by an oracle that re-derives every answer from the token pieces alone."""

from __future__ import annotations

import numpy as np
import pytest

from megasleep.data.tasks import get_task, parse_difficulty
from megasleep.data.tasks.pointer import guess_ceiling


def oracle(pieces: list[str], graph_len: int) -> tuple[int, str, str, int]:
    """From the decoded pieces only: parse the edges ``x -> y`` of the first ``graph_len`` tokens,
    check they form one directed cycle, read the query ``<hk> s <ans>``, walk k edges from s.
    Returns (k, start, answer, number of nodes)."""
    graph, query = pieces[:graph_len], pieces[graph_len:]
    body = [p for p in graph if p != "<pad>"]
    assert graph[: graph_len - len(body)] == ["<pad>"] * (graph_len - len(body)), "padding must come first"
    assert len(body) % 3 == 0
    nxt: dict[str, str] = {}
    for i in range(0, len(body), 3):
        a, arrow, b = body[i : i + 3]
        assert arrow == "->" and a != b and len(a) == 1 and len(b) == 1
        assert a not in nxt, f"node {a} has two out-edges"
        nxt[a] = b
    assert sorted(nxt.values()) == sorted(nxt), "in-degree 1 for every node"
    node, seen = next(iter(nxt)), set()
    while node not in seen:  # one cycle through every node
        seen.add(node)
        node = nxt[node]
    assert seen == set(nxt)
    hk, start, ans = query[:3]
    assert hk.startswith("<h") and ans == "<ans>"
    k = int(hk[2:-1])
    node = start
    for _ in range(k):
        node = nxt[node]
    return k, start, node, len(nxt)


@pytest.mark.parametrize("difficulties", ["1,2", "1-4"])
def test_pointer_answers_match_oracle(pointer_tok, difficulties):
    task = get_task("pointer")
    ks, ns = [], []
    for i in range(300):
        s = task.sample(7, "train", i, difficulties, pointer_tok)
        ids = s["input_ids"].tolist()
        pieces = [pointer_tok.id_to_piece(t) for t in ids]
        assert len(ids) == 36 + 4
        k, start, answer, n = oracle(pieces, 36)
        assert pieces[-1] == answer == s["meta"]["answer"] and start == s["meta"]["start"]
        assert k == s["meta"]["difficulty"] and n == s["meta"]["n_nodes"]
        assert np.flatnonzero(s["loss_mask"]).tolist() == [39] == s["meta"]["answer_positions"]
        assert answer != start
        ks.append(k)
        ns.append(n)
    assert set(ks) == set(parse_difficulty(difficulties))
    assert set(ns) == set(range(8, 13))  # n ~ U[8, 12]
    if difficulties == "1,2":
        assert 0.4 < np.mean(np.array(ks) == 1) < 0.6  # k in {1, 2} half and half


def test_pointer_edge_order_is_random(pointer_tok):
    """Edges are not listed along the cycle: the successor's own edge comes earlier about half the time."""
    task = get_task("pointer")
    earlier = total = 0
    for i in range(200):
        pieces = [pointer_tok.id_to_piece(t) for t in task.sample(0, "train", i, 1, pointer_tok)["input_ids"][:36]]
        body = [p for p in pieces if p != "<pad>"]
        src_pos = {body[j]: j for j in range(0, len(body), 3)}
        for j in range(0, len(body), 3):
            earlier += src_pos[body[j + 2]] < j
            total += 1
    assert 0.4 < earlier / total < 0.6


def test_pointer_rejects_bad_params(pointer_tok):
    task = get_task("pointer")
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="do not fit"):
        task.make_sample(rng, 1, pointer_tok, n_min=8, n_max=13, graph_len=36)
    with pytest.raises(ValueError, match="k must be"):
        task.make_sample(rng, 9, pointer_tok, **task.defaults)
    with pytest.raises(ValueError, match="return to the start"):
        task.make_sample(rng, 4, pointer_tok, n_min=4, n_max=4, graph_len=36)
    with pytest.raises(ValueError, match="6-cycle return to the start"):
        task.make_sample(rng, 6, pointer_tok, n_min=4, n_max=8, graph_len=36)


def test_guess_ceiling():
    assert guess_ceiling(1) == 1.0
    assert guess_ceiling(2) == pytest.approx(np.mean([1 / 5, 1 / 6, 1 / 7, 1 / 8, 1 / 9]))
