"""GSM-Infinite-style math word problems (docs/tasks.md): depth by the number of operations ``ops``.

Each problem is a random computation graph over named quantities ("the number of adult owls in
Maple Creek Zoo"), written out one sentence per quantity in realistic templates:

* the **relevant** subgraph has exactly ``ops`` derived quantities (each one arithmetic operation:
  sum, difference, product of two quantities, or ``k more / k less / k times`` one quantity) plus the
  constants they rest on; every derived quantity is an ancestor of the queried one, so computing the
  answer takes exactly ``ops`` operations;
* **distractor** sentences define further quantities from constants and from any earlier quantity
  (relevant ones included, so they look informative) until the sample reaches a target length in
  tokens drawn from ``[length_min, length_max]``; nothing relevant depends on them;
* the sentences are shuffled; the **question comes first**, then the context, then ``Answer:`` and the
  integer answer (no chain of thought). Loss only on the answer tokens.

Values stay integers in ``[0, max_value]``. ``meta.graph`` holds every quantity (name, op, args,
value) so the answer can be re-derived independently; ``meta.relevant`` lists the relevant ids.
The importer of the official GSM-Infinite files is :mod:`megasleep.data.tasks.gsm_official`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megasleep.data.sample import make_sample as _make

NAME = "gsm"
VERSION = "1"
DIFFICULTY = "ops"
DEFAULTS = {
    "length_min": 2000,
    "length_max": 3300,
    "leaf_max": 20,
    "max_value": 999,
    "reuse_p": 0.3,
    "max_tries": 50,
}

# ----------------------------------------------------------------------------------------------
# Themes: items x places give the quantity names. prep joins them ("in" / "at").
THEMES: dict[str, dict] = {
    "zoo": {
        "prep": "in",
        "items": ["adult owls", "adult foxes", "adult wolves", "adult otters", "adult lynxes", "adult bison",
                  "adult herons", "adult beavers", "adult badgers", "adult elks", "adult cranes", "adult hares",
                  "adult parrots", "adult tapirs", "adult lemurs", "adult pelicans", "adult moose", "adult ibexes",
                  "adult ravens", "adult geckos", "adult iguanas", "adult meerkats", "adult kudus", "adult zebras"],
        "places": ["Maple Creek Zoo", "Cedar Valley Park", "Pine Ridge Reserve", "Oakridge Sanctuary",
                   "Willow Bend Zoo", "Silver Lake Park", "Hollow Rock Reserve", "Birch Hill Zoo",
                   "Sunset Mesa Park", "Fern Gully Reserve", "Stone Bridge Zoo", "Amber Coast Sanctuary",
                   "Misty Glen Park", "Red Canyon Zoo", "Blue Harbor Reserve", "Elm Grove Zoo"],
    },
    "school": {
        "prep": "at",
        "items": ["math teachers", "music teachers", "art teachers", "science teachers", "history teachers",
                  "chemistry teachers", "biology teachers", "physics teachers", "drama teachers", "dance teachers",
                  "French teachers", "Spanish teachers", "Latin teachers", "geography teachers", "coding teachers",
                  "reading tutors", "writing tutors", "chess coaches", "swim coaches", "soccer coaches",
                  "tennis coaches", "choir directors", "lab assistants", "school nurses"],
        "places": ["Riverside High", "Lakeview Academy", "Northgate School", "Hillcrest High", "Westbrook Academy",
                   "Eastfield School", "Brookside High", "Summit Academy", "Greenwood School", "Parkview High",
                   "Fairmont Academy", "Kingsley School", "Bayside High", "Ridgeway Academy", "Clearwater School",
                   "Oakmont High"],
    },
    "festival": {
        "prep": "at",
        "items": ["comedy films", "documentaries", "animated shorts", "horror films", "crime dramas", "musicals",
                  "war films", "romance films", "science fiction films", "westerns", "thrillers", "biopics",
                  "silent films", "mystery films", "fantasy films", "sports films", "nature films", "road movies",
                  "heist films", "family films", "spy films", "disaster films", "dance films", "teen comedies"],
        "places": ["the Harbor Film Festival", "the Aurora Film Festival", "the Granite Film Festival",
                   "the Lantern Film Festival", "the Meadow Film Festival", "the Coral Film Festival",
                   "the Summit Film Festival", "the Prairie Film Festival", "the Beacon Film Festival",
                   "the Juniper Film Festival", "the Falcon Film Festival", "the Orchid Film Festival",
                   "the Quarry Film Festival", "the Tundra Film Festival", "the Velvet Film Festival",
                   "the Willow Film Festival"],
    },
    "bakery": {
        "prep": "at",
        "items": ["loaves of rye bread", "blueberry muffins", "apple pies", "cinnamon rolls", "lemon tarts",
                  "baguettes", "croissants", "bagels", "carrot cakes", "pretzels", "scones", "brownies",
                  "cheesecakes", "donuts", "fruit tarts", "oatmeal cookies", "banana breads", "eclairs",
                  "cupcakes", "macarons", "pound cakes", "sourdough loaves", "focaccias", "waffles"],
        "places": ["Sunrise Bakery", "Golden Crust Bakery", "Corner Oven", "Flour Mill Bakery", "Rolling Pin",
                   "Sweet Crumb Bakery", "Hearth House", "Morning Glory Bakery", "Stone Oven Bakery",
                   "Honey Wheat Bakery", "Baker Street Bakery", "Little Loaf", "Maple Leaf Bakery",
                   "Brick Oven Bakery", "Sugar Bowl Bakery", "Village Bakery"],
    },
    "library": {
        "prep": "in",
        "items": ["mystery novels", "poetry books", "cookbooks", "travel guides", "atlases", "comic books",
                  "biographies", "history books", "science books", "art books", "dictionaries", "encyclopedias",
                  "picture books", "fairy tale books", "music scores", "chess books", "gardening books",
                  "math textbooks", "language courses", "old newspapers", "maps", "journals", "photo albums",
                  "audio books"],
        "places": ["Oakwood Library", "the City Archive", "Pinecrest Library", "the Old Town Library",
                   "Lakeside Library", "the North Reading Room", "Cliffside Library", "the University Library",
                   "Harbor Library", "Rosewood Library", "the Central Library", "Meadowbrook Library",
                   "Elmwood Library", "the South Reading Room", "Highland Library", "Riverbend Library"],
    },
}

# Sentence templates. {X}: the defined quantity's name with a capital T; {A}, {B}: operand names.
TEMPLATES = {
    "const": ["{X} is {v}.", "There are {v} {item} {prep} {place}."],
    "add": ["{X} equals the sum of {A} and {B}.", "{X} is the total of {A} and {B}."],
    "sub": ["{X} equals the difference between {A} and {B}.", "{X} is {A} minus {B}."],
    "mul": ["{X} equals the product of {A} and {B}.", "{X} is {A} times {B}."],
    "addk": ["{X} is {k} more than {A}.", "{X} equals {A} plus {k}."],
    "subk": ["{X} is {k} less than {A}.", "{X} equals {A} minus {k}."],
    "mulk": ["{X} is {k} times {A}.", "{X} equals {k} times {A}."],
}
BINARY = ("add", "sub", "mul")
UNARY = ("addk", "subk", "mulk")
QUESTION = "Question: What is {name}?"
ANSWER_PROMPT = "Answer:"


def quantity_name(item: str, prep: str, place: str) -> str:
    return f"the number of {item} {prep} {place}"


def evaluate(op: str, vals: list[int], k: int | None = None) -> int:
    if op == "const":
        return int(k)
    if op == "add":
        return vals[0] + vals[1]
    if op == "sub":
        return vals[0] - vals[1]
    if op == "mul":
        return vals[0] * vals[1]
    if op == "addk":
        return vals[0] + k
    if op == "subk":
        return vals[0] - k
    if op == "mulk":
        return vals[0] * k
    raise ValueError(op)


@dataclass
class Node:
    id: int
    item: str
    place: str
    op: str = "const"
    args: tuple = ()
    k: int | None = None
    value: int = 0

    def as_meta(self, prep: str) -> dict:
        d = {"id": self.id, "name": quantity_name(self.item, prep, self.place), "op": self.op,
             "args": list(self.args), "value": int(self.value)}
        if self.k is not None and self.op != "const":
            d["k"] = int(self.k)
        return d


def _choose_binary(rng, a: int, b: int, max_value: int) -> tuple[str, bool]:
    """Pick a feasible binary op for operand values (a, b); returns (op, swap_operands)."""
    options = []
    if a + b <= max_value:
        options.append(("add", False))
    options.append(("sub", a < b))  # always feasible with the larger operand first
    if a * b <= max_value and min(a, b) >= 2:
        options.append(("mul", False))
    return options[int(rng.integers(len(options)))]


def _choose_unary(rng, v: int, leaf_max: int, max_value: int) -> tuple[str, int]:
    options = []
    k_add = int(rng.integers(1, leaf_max + 1))
    if v + k_add <= max_value:
        options.append(("addk", k_add))
    if v >= 1:
        options.append(("subk", int(rng.integers(1, min(v, leaf_max) + 1))))
    k_mul = int(rng.integers(2, 6))
    if 1 <= v and v * k_mul <= max_value:
        options.append(("mulk", k_mul))
    if not options:  # v == 0 and v + k too big cannot both hold; keep a safe fallback
        options.append(("addk", 1))
    return options[int(rng.integers(len(options)))]


class _Problem:
    """Incrementally built graph + sentences, with a token-length counter."""

    def __init__(self, rng, theme: str, length_of: Callable[[str], int], leaf_max: int, max_value: int,
                 reuse_p: float):
        self.rng = rng
        self.theme = theme
        t = THEMES[theme]
        self.prep = t["prep"]
        pairs = [(i, p) for i in t["items"] for p in t["places"]]
        order = rng.permutation(len(pairs))
        self.free = [pairs[j] for j in order]
        self.nodes: list[Node] = []
        self.sentences: dict[int, str] = {}
        self.lengths: dict[int, int] = {}
        self.length_of = length_of
        self.leaf_max, self.max_value, self.reuse_p = leaf_max, max_value, reuse_p

    def name(self, n: Node) -> str:
        return quantity_name(n.item, self.prep, n.place)

    def new_node(self) -> Node:
        if not self.free:
            raise RuntimeError("gsm: ran out of quantity names for this theme")
        item, place = self.free.pop()
        n = Node(len(self.nodes), item, place)
        self.nodes.append(n)
        return n

    def new_const(self) -> Node:
        n = self.new_node()
        n.op, n.k = "const", int(self.rng.integers(1, self.leaf_max + 1))
        n.value = n.k
        return n

    def sentence(self, n: Node) -> str:
        tpl = TEMPLATES[n.op][int(self.rng.integers(len(TEMPLATES[n.op])))]
        x = self.name(n)
        x = x[0].upper() + x[1:]
        names = [self.name(self.nodes[a]) for a in n.args]
        return tpl.format(X=x, v=n.value, item=n.item, prep=self.prep, place=n.place,
                          A=names[0] if names else "", B=names[1] if len(names) > 1 else "", k=n.k)

    def commit_sentence(self, n: Node) -> int:
        s = self.sentence(n)
        self.sentences[n.id] = s
        self.lengths[n.id] = self.length_of(s)
        return self.lengths[n.id]

    def set_op(self, n: Node, operands: list[Node]):
        """Choose a feasible op for ``n`` given its operand nodes (values known) and compute its value."""
        if len(operands) == 2:
            op, swap = _choose_binary(self.rng, operands[0].value, operands[1].value, self.max_value)
            if swap:
                operands = operands[::-1]
            n.op, n.args, n.k = op, (operands[0].id, operands[1].id), None
        else:
            op, k = _choose_unary(self.rng, operands[0].value, self.leaf_max, self.max_value)
            n.op, n.args, n.k = op, (operands[0].id,), k
        n.value = evaluate(n.op, [self.nodes[a].value for a in n.args], n.k)

    # --- relevant subgraph: exactly `ops` derived nodes, all ancestors of the query ------------
    def build_relevant(self, ops: int) -> Node:
        rng = self.rng
        derived = [self.new_node() for _ in range(ops)]  # derived[0] is the query
        children: list[list[int]] = [[] for _ in range(ops)]  # derived indices used as operands
        for i in range(1, ops):
            free = [j for j in range(i) if len(children[j]) < 2]  # node i-1 always has a free slot
            children[free[int(rng.integers(len(free)))]].append(i)
        leaves: list[Node] = []

        def leaf_or_reuse(j: int) -> Node:
            # reuse a constant, or a derived node deeper than j (keeps the graph acyclic), or a new constant
            deeper = [derived[m] for m in range(j + 1, ops) if m not in children[j]]
            if rng.random() < self.reuse_p and (leaves or deeper):
                pool = leaves + deeper
                return pool[int(rng.integers(len(pool)))]
            c = self.new_const()
            leaves.append(c)
            return c

        # arities first (a node with 2 derived children is binary), then values bottom-up
        arity = []
        for j in range(ops):
            nd = len(children[j])
            arity.append(2 if nd == 2 else (2 if rng.random() < 0.6 else 1))
        operands: list[list[Node]] = [[] for _ in range(ops)]
        for j in range(ops):
            ops_j = [derived[m] for m in children[j]]
            while len(ops_j) < arity[j]:
                cand = leaf_or_reuse(j)
                if any(cand is o for o in ops_j):  # no "the sum of X and X"
                    cand = self.new_const()
                    leaves.append(cand)
                ops_j.append(cand)
            operands[j] = [ops_j[int(o)] for o in rng.permutation(len(ops_j))]
        for j in reversed(range(ops)):  # children have larger indices: evaluate deepest first
            self.set_op(derived[j], operands[j])
        return derived[0]

    def add_distractor(self) -> Node:
        rng = self.rng
        if rng.random() < 0.3 or len(self.nodes) < 2:
            return self.new_const()
        pool = list(self.nodes)
        n = self.new_node()
        if rng.random() < 0.6:
            a, b = rng.choice(len(pool), size=2, replace=False)
            self.set_op(n, [pool[int(a)], pool[int(b)]])
        else:
            self.set_op(n, [pool[int(rng.integers(len(pool)))]])
        return n

    def drop_last(self, n: Node):
        assert self.nodes[-1] is n
        self.nodes.pop()
        self.free.append((n.item, n.place))
        self.sentences.pop(n.id, None)
        self.lengths.pop(n.id, None)


def closure(graph: list[dict], root: int) -> set[int]:
    """Ids of ``root`` and all quantities it depends on."""
    by_id = {g["id"]: g for g in graph}
    seen: set[int] = set()
    stack = [root]
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        stack.extend(by_id[i]["args"])
    return seen


def answer_token_ids(tokenizer, answer: str) -> tuple[list[int], list[int]]:
    """Split ``encode(answer)`` into (whitespace prefix, answer tokens): a lone leading '▁' piece
    belongs to the prompt, so every target token carries part of the number."""
    ids = tokenizer.encode(answer)
    if len(ids) > 1 and tokenizer.id_to_piece(ids[0]) == "\u2581":
        return ids[:1], ids[1:]
    return [], ids


def layout(tokenizer, question: str, context: list[str] | str, answer: str,
           encoded_context: list[list[int]] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of ``question | context | Answer: | answer`` and the answer's positions.

    Shared by the generator and the official-data importer so both produce the same layout."""
    ids = tokenizer.encode(question)
    if encoded_context is None:
        parts = [context] if isinstance(context, str) else context
        encoded_context = [tokenizer.encode(p) for p in parts]
    for c in encoded_context:
        ids += c
    ids += tokenizer.encode(ANSWER_PROMPT)
    prefix, ans = answer_token_ids(tokenizer, answer)
    ids += prefix
    positions = list(range(len(ids), len(ids) + len(ans)))
    ids += ans
    return ids, positions


def generate_problem(rng, ops: int, length_of: Callable[[str], int], length_min: int, length_max: int,
                     fixed_len: Callable[[str, int], int], leaf_max: int = 20, max_value: int = 999, reuse_p: float = 0.3,
                     max_tries: int = 50, theme: str | None = None) -> tuple[_Problem, Node, int]:
    """Build a problem whose total length is in ``[length_min, length_max]``.

    Total length = ``fixed_len(query name, answer)`` (question, answer prompt, answer) + the
    sentences' ``length_of``. Returns (problem, query node, total length)."""
    if ops < 1:
        raise ValueError(f"gsm: ops must be >= 1, got {ops}")
    themes = sorted(THEMES)
    for _ in range(max_tries):
        th = theme or themes[int(rng.integers(len(themes)))]
        prob = _Problem(rng, th, length_of, leaf_max, max_value, reuse_p)
        query = prob.build_relevant(ops)
        total = fixed_len(prob.name(query), query.value)
        for n in prob.nodes:
            total += prob.commit_sentence(n)
        if total > length_max:
            continue
        target = int(rng.integers(length_min, length_max + 1))
        misses = 0
        while total < target and misses < 8 and prob.free:
            n = prob.add_distractor()
            ln = prob.commit_sentence(n)
            if total + ln <= length_max:
                total += ln
                misses = 0
            else:
                prob.drop_last(n)
                misses += 1
        if length_min <= total <= length_max:
            return prob, query, total
    raise ValueError(f"gsm: could not fit a {ops}-op problem into [{length_min}, {length_max}] tokens "
                     f"after {max_tries} tries (band too narrow or too short for {ops} ops?)")


def make_sample(
    rng: np.random.Generator,
    difficulty: int,
    tokenizer,
    length_min: int = 2000,
    length_max: int = 3300,
    leaf_max: int = 20,
    max_value: int = 999,
    reuse_p: float = 0.3,
    max_tries: int = 50,
) -> dict:
    ops = int(difficulty)
    cache: dict[str, list[int]] = {}

    def enc(s: str) -> list[int]:
        ids = cache.get(s)
        if ids is None:
            ids = cache[s] = tokenizer.encode(s)
        return ids

    def fixed_len(qname: str, answer: int) -> int:  # question + "Answer:" + answer, exactly as laid out
        prefix, ans = answer_token_ids(tokenizer, str(answer))
        return len(enc(QUESTION.format(name=qname))) + len(enc(ANSWER_PROMPT)) + len(prefix) + len(ans)

    prob, query, total = generate_problem(rng, ops, lambda s: len(enc(s)), length_min, length_max, fixed_len,
                                      leaf_max, max_value, reuse_p, max_tries)
    order = [int(i) for i in rng.permutation(len(prob.nodes))]
    question = QUESTION.format(name=prob.name(query))
    answer = str(int(query.value))
    ids, positions = layout(tokenizer, question, [], answer,
                            encoded_context=[enc(prob.sentences[i]) for i in order])
    if len(ids) != total:  # the length bookkeeping must match the layout exactly
        raise AssertionError(f"gsm: laid out {len(ids)} tokens, counted {total}")
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[positions] = 1
    graph = [n.as_meta(prob.prep) for n in prob.nodes]
    relevant = sorted(closure(graph, query.id))
    meta = {
        "task": NAME,
        "difficulty": ops,
        "answer": answer,
        "answer_positions": positions,
        "theme": prob.theme,
        "query": query.id,
        "graph": graph,
        "relevant": relevant,
        "sentence_order": order,
        "length": len(ids),
        "length_band": [int(length_min), int(length_max)],
    }
    return _make(ids, mask, meta)


def corpus_texts(n: int = 300, seed: int = 0, words_min: int = 150, words_max: int = 400) -> list[str]:
    """Plain-text problems (no tokenizer needed) to train the GSM tokenizer on."""
    rng = np.random.default_rng(seed)
    out = []

    def words(s: str) -> int:
        return len(s.split())

    def fixed(q: str, answer: int) -> int:
        return words(QUESTION.format(name=q)) + 2

    for i in range(n):
        theme = sorted(THEMES)[i % len(THEMES)]
        ops = int(rng.integers(1, 9))
        prob, query, _ = generate_problem(rng, ops, words, words_min, words_max, fixed, theme=theme)
        sents = [QUESTION.format(name=prob.name(query))]
        sents += [prob.sentences[int(j)] for j in rng.permutation(len(prob.nodes))]
        sents.append(f"{ANSWER_PROMPT} {query.value}")
        out.append(" ".join(sents))
    return out


def make_task_tokenizer(out_dir, vocab_size: int = 2000, **_params):
    """BPE on generated problems (digits split, byte fallback), so all GSM text shares one model."""
    from pathlib import Path

    from megasleep.data.tokenizer import train_tokenizer

    return train_tokenizer(Path(out_dir) / f"{NAME}.model", texts=corpus_texts(), vocab_size=vocab_size,
                           keep_whitespace=False,  # one-line problems: the compact normalising model
                           model_type="bpe", byte_fallback=True, split_digits=True,
                           user_defined_symbols=[str(d) for d in range(10)], num_threads=1,
                           hard_vocab_limit=False, max_chars=None)
