"""Tokenizers: one sentencepiece path for text and tasks; identity = content hash of the .model file."""

from __future__ import annotations

import hashlib
import pickle

import pytest

from megasleep.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    load_tokenizer,
    train_symbol_tokenizer,
    train_tokenizer,
)


def test_text_tokenizer_roundtrip_specials_digits(text_tok):
    tok = text_tok
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID)
    assert tok.vocab_size == 400
    text = "the river ran past 2024 quiet houses"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # digits are split: every digit is its own piece
    pieces = [tok.id_to_piece(i) for i in tok.encode("12345")]
    assert [p for p in pieces if p != "\u2581"] == list("12345")
    # byte fallback: characters never seen in training survive a round trip (no <unk>)
    odd = "Zürich ✓ 東京"
    assert UNK_ID not in tok.encode(odd)
    assert tok.decode(tok.encode(odd)) == odd
    assert tok.encode("a", add_bos=True, add_eos=True)[0] == BOS_ID
    assert tok.encode("a", add_bos=True, add_eos=True)[-1] == EOS_ID


def test_hash_is_content_hash_and_stable(text_tok, text_corpus, tmp_path):
    with open(text_tok.path, "rb") as f:
        assert text_tok.hash == hashlib.sha256(f.read()).hexdigest()
    again = train_tokenizer(tmp_path / "again", corpus=[text_corpus / "a.jsonl"], text_field="body",
                            vocab_size=400, num_threads=1)
    assert again.hash == text_tok.hash  # deterministic training
    other = train_tokenizer(tmp_path / "other", corpus=[text_corpus / "a.jsonl"], text_field="body",
                            vocab_size=380, num_threads=1)
    assert other.hash != text_tok.hash
    loaded = load_tokenizer(str(text_tok.path)[: -len(".model")])  # ".model" may be omitted
    assert loaded.hash == text_tok.hash and loaded.vocab_size == text_tok.vocab_size


def test_train_from_txt_and_parquet(tmp_path, text_corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha beta gamma delta " * 20, "epsilon zeta eta theta " * 20]}),
                   tmp_path / "c.parquet")
    tok = train_tokenizer(tmp_path / "pq", corpus=str(tmp_path / "*.parquet"), text_field="content",
                          vocab_size=300, num_threads=1)
    assert tok.decode(tok.encode("alpha theta")) == "alpha theta"
    tok2 = train_tokenizer(tmp_path / "txt", corpus=text_corpus / "b.txt", vocab_size=300, num_threads=1)
    assert tok2.vocab_size == 300


def test_symbol_tokenizer_each_symbol_one_piece(tmp_path):
    syms = ["0", "1", "<q>", "<h12>", "AB"]
    tok = train_symbol_tokenizer(syms, tmp_path / "sym")
    ids = [tok.piece_to_id(s) for s in syms]
    assert len(set(ids)) == len(syms) and all(i >= 4 for i in ids)
    assert tok.decode(ids) == "01<q><h12>AB"
    with pytest.raises(KeyError):
        tok.piece_to_id("<nope>")
    assert train_symbol_tokenizer(syms, tmp_path / "sym2").hash == tok.hash
    with pytest.raises(ValueError):
        train_symbol_tokenizer(["a b"], tmp_path / "bad")


def test_pickle_roundtrip(text_tok):
    t2 = pickle.loads(pickle.dumps(text_tok))
    assert t2.hash == text_tok.hash and t2.encode("the fox") == text_tok.encode("the fox")


def test_task_tokenizers_share_one_path(r110_tok, depo_tok, gsm_tok):
    for tok in (r110_tok, depo_tok, gsm_tok):
        assert tok.path.endswith(".model") and len(tok.hash) == 64
        assert (tok.pad_id, tok.eos_id) == (PAD_ID, EOS_ID)
    assert len({r110_tok.hash, depo_tok.hash, gsm_tok.hash}) == 3


def test_task_tokenizers_are_reproducible(tmp_path, gsm_tok, depo_tok):
    from megasleep.data.tasks import get_task, make_task_tokenizer

    assert make_task_tokenizer("gsm", tmp_path).hash == gsm_tok.hash
    assert get_task("depo").make_task_tokenizer(tmp_path).hash == depo_tok.hash


CODE = '''class Stack:
    """A stack.

    >>> Stack().push(3)
    """

    def __init__(self):
        self.items = []  # two  spaces   here

\tdef tabbed(self, x):
        if x:
            return   x * 1024


'''
MATHS = ("Let  f(x) = 3x^2 + 2x - 7.\n\n"
         "    \\int_0^1 f(x)\\,dx = 1 + 1 - 7 = -5\n"
         "  | a_11  a_12 |\n  | a_21  a_22 |   (det = a_11 a_22 - a_12 a_21)\n"
         "∑_{i=1}^{n} i = n(n+1)/2,   π ≈ 3.14159   \n")


@pytest.fixture(scope="module")
def intact_tok(tmp_path_factory):
    """Default options, trained on code and maths text."""
    texts = [CODE.replace("Stack", f"Stack{i}").replace("1024", str(i * 37)) for i in range(40)] + [MATHS] * 20
    return train_tokenizer(tmp_path_factory.mktemp("intact") / "tok", texts=texts, vocab_size=400,
                           hard_vocab_limit=False, num_threads=1)


@pytest.mark.parametrize("text", [CODE, MATHS, "  leading spaces", "\n\nnewlines first", "x", "trailing \t \n"],
                         ids=["code", "maths", "leading", "newlines", "one-char", "trailing"])
def test_default_tokenizer_keeps_text_intact(intact_tok, text):
    assert intact_tok.decode(intact_tok.encode(text)) == text
    assert UNK_ID not in intact_tok.encode(text + " Zürich ✓ 東京")  # byte fallback


def test_default_tokenizer_splits_digits_and_learns_whitespace_pieces(intact_tok):
    pieces = [intact_tok.id_to_piece(i) for i in intact_tok.encode("x = 12345")]
    assert [p for p in pieces if p.isdigit()] == list("12345")
    assert any(set(p) == {"\u2581"} and len(p) >= 4 for p in (intact_tok.id_to_piece(i)
                                                              for i in range(intact_tok.vocab_size)))


def test_normalizing_tokenizer_loses_layout(tmp_path):
    """What keep_whitespace=False (sentencepiece's defaults, used by task tokenizers) does to code."""
    tok = train_tokenizer(tmp_path / "norm", texts=[CODE] * 20, vocab_size=400, hard_vocab_limit=False,
                          num_threads=1, keep_whitespace=False)
    assert tok.decode(tok.encode(CODE)) != CODE


def test_tokenizer_cli_trains_a_directory_tree_and_keeps_code(tmp_path):
    """A directory of mixed files: every readable file is read (nested ones too), skips are reported."""
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "corpus"
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "pkg" / "__pycache__").mkdir()
    for i in range(12):
        (src / "pkg" / "sub" / f"m{i}.py").write_text(CODE.replace("Stack", f"Stack{i}"))
    (src / "notes.md").write_text("# Notes\n\n* one\n* two\n")
    (src / "README").write_text(MATHS)
    (src / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0\1\2")
    (src / "lib.so").write_bytes(b"\x7fELF\0\0")
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, str(root / "data_pipelines/train_tokenizer.py"), "--input", str(src),
                        "--vocab-size", "400", "--out", str(tmp_path / "tok")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "read 14 files" in r.stderr and "14 documents" in r.stderr
    assert "lib.so" in r.stderr and "__pycache__" in r.stderr
    tok = load_tokenizer(tmp_path / "tok.model")
    assert tok.decode(tok.encode(CODE)) == CODE
    # a glob of *.py (recursive) works too; a glob matching nothing is one clear line, exit code 2
    r = subprocess.run([sys.executable, str(root / "data_pipelines/train_tokenizer.py"), "--input",
                        str(src / "**" / "*.py"), "--vocab-size", "400", "--out", str(tmp_path / "tok2")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "read 12 files" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, str(root / "data_pipelines/train_tokenizer.py"), "--input",
                        str(src / "*.nothing"), "--out", str(tmp_path / "tok3")], capture_output=True, text=True)
    assert r.returncode == 2 and "no file matches" in r.stderr and "Traceback" not in r.stderr


def test_too_small_vocabulary_is_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=100 is too small for this corpus: it needs at least \d+ pieces"):
        train_tokenizer(tmp_path / "small", texts=["def f(x):\n    return x\n"] * 10, vocab_size=100, num_threads=1)
