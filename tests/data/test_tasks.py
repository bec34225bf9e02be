"""Task generators checked against independent simple implementations (decoded from the tokens)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from megasleep.data.tasks import TASKS, get_task, parse_difficulty
from megasleep.data.tasks.rule110 import rollout, rollout_bits


# ---------------------------------------------------------------------------------------------- rule 110
def rule110_oracle(bits: list[int], t: int) -> list[int]:
    """Direct simulation: the rule number's bit (4l + 2c + r) of 110, periodic boundary."""
    w = len(bits)
    x = list(bits)
    for _ in range(t):
        x = [(110 >> (4 * x[(i - 1) % w] + 2 * x[i] + x[(i + 1) % w])) & 1 for i in range(w)]
    return x


def test_oracle_itself():
    # a lone 1 grows to the left under Rule 110: ...0100... -> ...1100...
    assert rule110_oracle([0, 0, 0, 1, 0, 0, 0, 0], 1) == [0, 0, 1, 1, 0, 0, 0, 0]
    assert rule110_oracle([1, 1, 1], 1) == [0, 0, 0]  # 111 -> 0 everywhere (periodic)


def test_rollout_matches_oracle():
    rng = np.random.default_rng(0)
    for t in [0, 1, 2, 5, 17, 40]:
        x = rng.integers(0, 2, size=(6, 24))
        got = rollout(x, t)
        for row, g in zip(x, got):
            assert g.tolist() == rule110_oracle(row.tolist(), t) == rollout_bits(row.tolist(), t)


@pytest.mark.parametrize("t", [0, 1, 7, 32])
def test_rule110_samples(r110_tok, t):
    task = get_task("rule110")
    zero, one, q = (r110_tok.piece_to_id(s) for s in ("0", "1", "<q>"))
    for i in range(10):
        s = task.make_sample(np.random.default_rng(100 * t + i), t, r110_tok, **task.defaults)
        ids = s["input_ids"].tolist()
        assert len(ids) == 4 * 24 + 1 + 4
        assert ids[96] == q and all(x in (zero, one) for j, x in enumerate(ids) if j != 96)
        strings = [[1 if x == one else 0 for x in ids[24 * k : 24 * (k + 1)]] for k in range(4)]  # one per L=24 window
        labels = [1 if x == one else 0 for x in ids[97:]]
        assert labels == [rule110_oracle(sbits, t)[0] for sbits in strings]
        assert np.flatnonzero(s["loss_mask"]).tolist() == [97, 98, 99, 100] == s["meta"]["answer_positions"]
        assert s["meta"]["answer"] == "".join(map(str, labels)) and s["meta"]["difficulty"] == t
        assert s["doc_starts"].tolist() == [0]


def test_rule110_configurable_shape(r110_tok):
    s = get_task("rule110").make_sample(np.random.default_rng(1), 3, r110_tok, n_strings=2, width=8)
    assert s["input_ids"].size == 2 * 8 + 1 + 2


# ---------------------------------------------------------------------------------------------- depo
def test_depo_answers_by_walking_the_cycle(depo_tok):
    task = get_task("depo")
    pad = depo_tok.pad_id
    hop_of = {depo_tok.piece_to_id(f"<h{k}>"): k for k in range(1, 65)}
    ans = depo_tok.piece_to_id("<ans>")
    for i, k in enumerate([1, 2, 4, 8, 16, 16, 3, 64]):
        s = task.make_sample(np.random.default_rng(i), k, depo_tok, **task.defaults)
        ids = s["input_ids"].tolist()
        assert len(ids) == 360
        graph = ids[:300]
        n_pad = next(j for j, x in enumerate(graph) if x != pad)
        assert all(x == pad for x in graph[:n_pad]) and (300 - n_pad) % 4 == 0
        edges = [tuple(graph[j : j + 4]) for j in range(n_pad, 300, 4)]
        succ = {(a, b): (c, d) for a, b, c, d in edges}
        n = len(edges)
        assert len(succ) == n == s["meta"]["n_nodes"] and set(succ.values()) == set(succ)  # in = out = 1
        node, steps = edges[0][:2], 0  # a single cycle through all n nodes
        while True:
            node, steps = succ[node], steps + 1
            if node == edges[0][:2]:
                break
        assert steps == n
        starts = set()
        for q in range(10):
            h, s1, s2, a, r1, r2 = ids[300 + 6 * q : 306 + 6 * q]
            assert hop_of[h] == k and a == ans
            node = (s1, s2)
            starts.add(node)
            for _ in range(k):
                node = succ[node]
            assert (r1, r2) == node
        assert len(starts) == 10
        want = [p for q in range(10) for p in (304 + 6 * q, 305 + 6 * q)]
        assert np.flatnonzero(s["loss_mask"]).tolist() == want == s["meta"]["answer_positions"]


def test_depo_node_names_two_tokens(depo_tok):
    s = get_task("depo").make_sample(np.random.default_rng(5), 2, depo_tok, **get_task("depo").defaults)
    q = s["meta"]["queries"][0]
    assert len(q["start"]) == 2 and depo_tok.decode(s["input_ids"][q["positions"]].tolist()) == q["answer"]


# ---------------------------------------------------------------------------------------------- gsm
QNAME = r"(the number of .+?)"
PATTERNS = [  # the generator's phrasings, parsed independently
    (re.compile(rf"^{QNAME} (?:is|equals) (\d+)$"), "const"),
    (re.compile(r"^There are (\d+) (.+)$"), "there"),
    (re.compile(rf"^{QNAME} (?:equals the sum of|is the total of) (the number of .+?) and (the number of .+)$"), "add"),
    (re.compile(rf"^{QNAME} equals the difference between (the number of .+?) and (the number of .+)$"), "sub"),
    (re.compile(rf"^{QNAME} is (the number of .+?) minus (the number of .+)$"), "sub"),
    (re.compile(rf"^{QNAME} (?:equals the product of (the number of .+?) and|is (the number of .+?) times) "
                r"(the number of .+)$"), "mul"),
    (re.compile(rf"^{QNAME} (?:is|equals) (\d+) times (the number of .+)$"), "mulk"),
    (re.compile(rf"^{QNAME} is (\d+) more than (the number of .+)$"), "addk"),
    (re.compile(rf"^{QNAME} equals (the number of .+) plus (\d+)$"), "addk2"),
    (re.compile(rf"^{QNAME} is (\d+) less than (the number of .+)$"), "subk"),
    (re.compile(rf"^{QNAME} equals (the number of .+) minus (\d+)$"), "subk2"),
]


def parse_problem(text: str):
    m = re.match(r"^Question: What is (the number of .+?)\? (.*) Answer:$", text)
    assert m, text[:200]
    query, body = m.group(1), m.group(2)
    eqs = {}
    for sent in re.split(r"(?<=\.) ", body):
        assert sent.endswith("."), sent
        sent = sent[:-1]
        if sent.startswith("The number"):
            sent = "t" + sent[1:]
        hits = [(pat.match(sent), kind) for pat, kind in PATTERNS]
        hits = [(mm, kind) for mm, kind in hits if mm]
        assert hits, f"unparsed sentence: {sent}"
        mm, kind = hits[0]
        g = [x for x in mm.groups() if x is not None]
        if kind == "const":
            name, eq = g[0], ("const", int(g[1]))
        elif kind == "there":
            name, eq = "the number of " + g[1], ("const", int(g[0]))
        elif kind in ("add", "sub", "mul"):
            name, eq = g[0], (kind, g[1], g[2])
        elif kind in ("mulk", "addk", "subk"):
            name, eq = g[0], (kind, g[2], int(g[1]))
        else:  # addk2 / subk2: "A plus k"
            name, eq = g[0], (kind[:-1], g[1], int(g[2]))
        assert name not in eqs, f"{name} defined twice"
        eqs[name] = eq
    return query, eqs


def evaluate(eqs, name, memo=None, used=None):
    memo = {} if memo is None else memo
    used = set() if used is None else used
    used.add(name)
    if name in memo:
        return memo[name]
    eq = eqs[name]
    if eq[0] == "const":
        v = eq[1]
    elif eq[0] in ("add", "sub", "mul"):
        a, b = evaluate(eqs, eq[1], memo, used), evaluate(eqs, eq[2], memo, used)
        v = a + b if eq[0] == "add" else a - b if eq[0] == "sub" else a * b
    else:
        a, k = evaluate(eqs, eq[1], memo, used), eq[2]
        v = a + k if eq[0] == "addk" else a - k if eq[0] == "subk" else a * k
    memo[name] = v
    return v


@pytest.mark.parametrize("ops", [1, 2, 3, 5, 8])
def test_gsm_answer_rederived_from_text(gsm_tok, ops):
    task = get_task("gsm")
    for i in range(4):
        s = task.make_sample(np.random.default_rng(1000 * ops + i), ops, gsm_tok,
                             **{**task.defaults, "length_min": 300, "length_max": 450})
        ids, pos = s["input_ids"], s["meta"]["answer_positions"]
        assert 300 <= ids.size <= 450  # length within the target band
        assert pos == list(range(pos[0], ids.size)) and np.flatnonzero(s["loss_mask"]).tolist() == pos
        answer_text = gsm_tok.decode(ids[pos].tolist()).strip()
        query, eqs = parse_problem(gsm_tok.decode(ids[: pos[0]].tolist()).strip())
        used: set = set()
        value = evaluate(eqs, query, used=used)
        assert str(value) == answer_text == s["meta"]["answer"]
        assert 0 <= value <= task.defaults["max_value"]
        n_ops = sum(1 for n in used if eqs[n][0] != "const")
        assert n_ops == ops == s["meta"]["difficulty"]  # op count exact
        assert len(eqs) > len(used)  # distractors present
        # the recorded graph says the same thing as the text
        graph = {g["name"]: g for g in s["meta"]["graph"]}
        assert set(graph) == set(eqs)
        memo: dict = {}
        for name in eqs:
            assert evaluate(eqs, name, memo) == graph[name]["value"]


def test_gsm_default_band_and_question_first(gsm_tok):
    task = get_task("gsm")
    s = task.make_sample(np.random.default_rng(7), 6, gsm_tok, **task.defaults)
    assert 2000 <= s["input_ids"].size <= 3300
    assert gsm_tok.decode(s["input_ids"][:12].tolist()).startswith("Question: What is the number of")
    with pytest.raises(ValueError):  # 8 ops cannot fit in 40 tokens
        task.make_sample(np.random.default_rng(0), 8, gsm_tok, **{**task.defaults, "length_min": 30,
                                                                   "length_max": 40, "max_tries": 3})


# ---------------------------------------------------------------------------------------------- registry
def test_registry_and_determinism(r110_tok, depo_tok, gsm_tok, pointer_tok):
    assert set(TASKS) == {"rule110", "depo", "gsm", "pointer"}
    toks = {"rule110": r110_tok, "depo": depo_tok, "gsm": gsm_tok, "pointer": pointer_tok}
    for name, task in TASKS.items():
        assert task.version and task.generator.startswith("megasleep.data.tasks.")
        params = {"length_min": 100, "length_max": 200} if name == "gsm" else {}
        a = task.sample(1, "train", 5, "1-4", toks[name], **params)
        b = task.sample(1, "train", 5, "1-4", toks[name], **params)
        c = task.sample(1, "val", 5, "1-4", toks[name], **params)
        assert np.array_equal(a["input_ids"], b["input_ids"]) and a["meta"] == b["meta"]
        assert not np.array_equal(a["input_ids"], c["input_ids"])
        assert a["meta"]["version"] == task.version
    with pytest.raises(KeyError):
        get_task("nope")
    with pytest.raises(ValueError):
        TASKS["depo"].params(bogus=1)


def test_parse_difficulty():
    assert parse_difficulty("1-4") == [1, 2, 3, 4]
    assert parse_difficulty("1,2,8") == [1, 2, 8]
    assert parse_difficulty(32) == [32]
    assert parse_difficulty("2-3,7") == [2, 3, 7]
