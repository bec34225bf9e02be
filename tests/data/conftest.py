"""Fixtures of the data tests: task tokenizers and small datasets, built once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def r110_tok(tok_dir):
    from megasleep.data.tasks import get_task

    return get_task("rule110").make_task_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def depo_tok(tok_dir):
    from megasleep.data.tasks import get_task

    return get_task("depo").make_task_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def pointer_tok(tok_dir):
    from megasleep.data.tasks import get_task

    return get_task("pointer").make_task_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def gsm_tok(tok_dir):
    from megasleep.data.tasks import get_task

    return get_task("gsm").make_task_tokenizer(tok_dir)


@pytest.fixture(scope="session")
def r110_data(tmp_path_factory, r110_tok):
    """rule110: train 8 shards x 40 samples, val 60, test 60 (t in 1..8)."""
    from megasleep.data.shards import build_task_dataset

    out = tmp_path_factory.mktemp("r110")
    manifests = build_task_dataset("rule110", out, {"train": 320, "val": 60, "test": 60}, seed=3,
                                   difficulties="1-8", tokenizer=r110_tok.path, shard_size=40, workers=1,
                                   progress=False)
    return out, manifests


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A small jsonl + txt corpus with documents of varied lengths."""
    import json
    import random

    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = ("the river ran past old stone walls while 17 herons watched; a lantern glowed near 2024 quiet "
             "houses and every child counted 3 boats, 45 ducks and one fox").split()
    with open(d / "a.jsonl", "w") as f:
        for i in range(60):
            n = rng.randint(5, 120)
            f.write(json.dumps({"id": i, "body": " ".join(rng.choice(words) for _ in range(n))}) + "\n")
    (d / "b.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(5)))
    return d


@pytest.fixture(scope="session")
def text_tok(tmp_path_factory, text_corpus):
    from megasleep.data.tokenizer import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("texttok") / "text", corpus=[text_corpus / "a.jsonl"],
                           text_field="body", vocab_size=400, num_threads=1)
