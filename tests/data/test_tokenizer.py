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
