"""One tokenizer path for text corpora and synthetic tasks: sentencepiece models.

* :func:`train_tokenizer` trains a BPE or unigram model (byte fallback, digits split, user-defined
  symbols, fixed special ids) on any corpus (files read by :mod:`megasleep.data.corpus`, or an
  iterable of strings) and writes ``<out>.model``. By default the model keeps text intact
  (:data:`KEEP_WHITESPACE_OPTIONS`): newlines, indentation and runs of spaces survive
  ``decode(encode(text))`` exactly, so source code and formatted maths can be represented.
* :func:`load_tokenizer` returns a :class:`Tokenizer`, whose :attr:`Tokenizer.hash` (sha256 of the
  ``.model`` bytes) is the tokenizer's identity: it is recorded in every dataset manifest and every
  checkpoint, and :func:`megasleep.data.manifest.check_tokenizer_hash` compares them.
* Task tokenizers are sentencepiece models too, trained by :func:`train_symbol_tokenizer` from the
  task's alphabet declared as user-defined symbols (each symbol is exactly one piece).

Special ids are the same for every model this module trains: ``unk=0, bos=1, eos=2, pad=3``.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from megasleep.atomic import atomic_write

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")

# sentencepiece's defaults normalise text (NFKC, which also maps "\n" and "\t" to spaces), collapse
# runs of spaces and add a leading space to every input. These options turn all of that off, so that
# every character is kept; whitespace-only pieces ("▁▁▁▁" for an indent) may be learnt.
# A newline needs no user-defined symbol: with identity normalisation it is an ordinary character
# (learnt into pieces such as "():\n"), and byte fallback covers it in any case.
KEEP_WHITESPACE_OPTIONS = {
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
}


class Tokenizer:
    """A loaded sentencepiece model. Cheap to pickle (re-loads from the model bytes)."""

    def __init__(self, model_bytes: bytes, path: str | None = None):
        import sentencepiece as spm

        self._bytes = bytes(model_bytes)
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        self.hash = hashlib.sha256(self._bytes).hexdigest()
        self._piece_cache: dict[str, int] = {}

    # pickling (DataLoader workers, process pools): ship the bytes, rebuild the processor
    def __getstate__(self):
        return {"model_bytes": self._bytes, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_bytes"], state["path"])

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self.sp.pad_id())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def bos_id(self) -> int:
        return int(self.sp.bos_id())

    @property
    def unk_id(self) -> int:
        return int(self.sp.unk_id())

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if add_bos:
            ids = [self.bos_id, *ids]
        if add_eos:
            ids = [*ids, self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        out = self.sp.encode(list(texts))
        if add_bos or add_eos:
            out = [([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else []) for ids in out]
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def piece_to_id(self, piece: str) -> int:
        """Id of one piece; raises KeyError for a piece the model does not have (no silent <unk>)."""
        cached = self._piece_cache.get(piece)
        if cached is not None:
            return cached
        i = int(self.sp.piece_to_id(piece))
        if i == self.unk_id and piece != SPECIAL_PIECES[UNK_ID]:
            raise KeyError(f"piece {piece!r} is not in tokenizer {self.path or self.hash[:12]}")
        self._piece_cache[piece] = i
        return i

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def info(self) -> dict:
        """What manifests and checkpoints record about the tokenizer."""
        return {
            "path": self.path,
            "hash": self.hash,
            "vocab_size": self.vocab_size,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "bos_id": self.bos_id,
        }

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load ``path`` (a ``.model`` file; ``.model`` is appended when missing)."""
    p = Path(path)
    if not p.exists() and p.suffix != ".model" and Path(str(p) + ".model").exists():
        p = Path(str(p) + ".model")
    if not p.exists():
        raise FileNotFoundError(f"tokenizer model not found: {p}")
    return Tokenizer(p.read_bytes(), str(p))


def _model_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    if p.suffix != ".model":
        p = Path(str(p) + ".model")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _write_model(model_bytes: bytes, out: str | os.PathLike) -> Tokenizer:
    path = _model_path(out)
    atomic_write(path, model_bytes)
    return Tokenizer(model_bytes, str(path))


def _line_blocks(text: str, max_bytes: int) -> Iterator[str]:
    """``text`` cut at line ends into blocks of at most ``max_bytes`` UTF-8 bytes, every character kept
    (sentencepiece skips longer "sentences"; a single longer line is cut inside)."""
    block: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if size + n > max_bytes and block:
            yield "".join(block)
            block, size = [], 0
        while n > max_bytes:  # one very long line (minified code, a table): cut by characters
            cut = max_bytes // 4  # a character is at most 4 bytes
            yield line[:cut]
            line = line[cut:]
            n = len(line.encode("utf-8"))
        block.append(line)
        size += n
    if block:
        yield "".join(block)


def _iter_texts(corpus, texts, text_field: str, max_chars: int | None, keep_whitespace: bool,
                max_sentence_length: int, stats: dict | None) -> Iterator[str]:
    if (corpus is None) == (texts is None):
        raise ValueError("give exactly one of corpus= (paths / globs) or texts= (an iterable of strings)")
    if corpus is not None:
        from megasleep.data.corpus import iter_documents

        docs = (d.text for d in iter_documents(corpus, text_field=text_field, stats=stats))
    else:
        docs = iter(texts)
    total = 0
    for text in docs:
        if not text:
            continue
        if keep_whitespace:
            # whole blocks of lines, whitespace and newlines included: what the model must learn to write
            pieces = (b for b in _line_blocks(text, max_sentence_length) if b.strip())
        else:
            # the compact form of task tokenizers: non-empty stripped lines
            pieces = (ln.strip() for ln in text.split("\n") if ln.strip())
        for piece in pieces:
            if max_chars is not None and total >= max_chars:
                return
            total += len(piece)
            yield piece


def train_tokenizer(
    out: str | os.PathLike,
    corpus=None,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 8000,
    model_type: str = "bpe",
    keep_whitespace: bool = True,
    byte_fallback: bool = True,
    split_digits: bool = True,
    user_defined_symbols: Sequence[str] = (),
    character_coverage: float = 0.9995,
    text_field: str = "text",
    max_chars: int | None = 200_000_000,
    max_sentence_length: int = 16384,
    num_threads: int | None = None,
    hard_vocab_limit: bool = True,
    extra: dict | None = None,
    stats: dict | None = None,
) -> Tokenizer:
    """Train a sentencepiece model and write ``out`` (``.model`` is appended when missing).

    Text comes from ``corpus`` (a path / glob / directory / list of them: jsonl, json, txt, parquet;
    see :func:`megasleep.data.corpus.iter_documents`, ``text_field`` picks the field) or from
    ``texts`` (an iterable of strings). ``max_chars`` caps how much text is read (sentencepiece samples anyway).
    ``keep_whitespace`` (default): text round-trips exactly (:data:`KEEP_WHITESPACE_OPTIONS`; documents
    are fed as blocks of whole lines); ``False`` gives sentencepiece's normalising defaults, trained on
    stripped lines (task tokenizers, whose text is one line of symbols). ``stats`` (a dict) receives
    what was read (see :func:`megasleep.data.corpus.iter_documents`; ``corpus_report`` prints it).
    Special ids are fixed: unk=0, bos=1, eos=2, pad=3. Returns the loaded tokenizer.
    """
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if corpus is not None:  # fail on a missing input here, not from inside sentencepiece's reader
        from megasleep.data.corpus import scan_corpus

        corpus = scan_corpus(corpus)
    model = io.BytesIO()
    kwargs = dict(
        sentence_iterator=_iter_texts(corpus, texts, text_field, max_chars, keep_whitespace, max_sentence_length,
                                      stats),
        model_writer=model,
        vocab_size=int(vocab_size),
        model_type=model_type,
        byte_fallback=byte_fallback,
        split_digits=split_digits,
        user_defined_symbols=list(user_defined_symbols),
        character_coverage=character_coverage,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=int(num_threads or min(8, os.cpu_count() or 1)),
        max_sentence_length=max_sentence_length,
        hard_vocab_limit=hard_vocab_limit,
        minloglevel=2,
    )
    if keep_whitespace:
        kwargs.update(KEEP_WHITESPACE_OPTIONS)
    kwargs.update(extra or {})
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1]
        if "Vocabulary size too high" in msg:
            raise ValueError(f"{msg} -- the corpus is too small / uniform for vocab_size={vocab_size}: lower it, "
                             "or pass hard_vocab_limit=False to accept a smaller vocabulary") from None
        if "smaller than required_chars" in msg:
            need = msg.split(" vs ")[-1].split(".")[0]
            raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: it needs at least {need} pieces "
                             "(its characters, 4 specials and, with byte fallback, 256 byte pieces)") from None
        raise ValueError(f"sentencepiece could not train a tokenizer: {msg}") from None
    return _write_model(model.getvalue(), out)


def train_symbol_tokenizer(symbols: Sequence[str], out: str | os.PathLike, corpus: Iterable[str] = ()) -> Tokenizer:
    """A task tokenizer: every symbol of ``symbols`` is one user-defined piece (plus the specials).

    ``corpus`` (optional) adds ordinary text to train on; without it the vocabulary is just the
    specials, the symbols and sentencepiece's minimal character set. Deterministic: the same
    symbols give a byte-identical model (same hash).
    """
    symbols = list(dict.fromkeys(symbols))
    for s in symbols:
        if not s or any(c.isspace() for c in s):
            raise ValueError(f"task symbol {s!r} must be non-empty and contain no whitespace")
    lines = list(corpus) or [" ".join(symbols)]
    tok = train_tokenizer(
        out,
        texts=lines,
        vocab_size=len(SPECIAL_PIECES) + len(symbols) + 1,
        model_type="bpe",
        keep_whitespace=False,
        byte_fallback=False,
        split_digits=True,
        user_defined_symbols=symbols,
        character_coverage=1.0,
        max_chars=None,
        num_threads=1,
        hard_vocab_limit=False,
    )
    for s in symbols:  # guard: each symbol must be one piece
        tok.piece_to_id(s)
    return tok
