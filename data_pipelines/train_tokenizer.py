#!/usr/bin/env python
"""Train a sentencepiece tokenizer on a corpus, or build a task's tokenizer.

    # text: BPE, byte fallback, digits split, every newline / indent / space kept (decode(encode(x)) == x);
    # inputs: directories (walked), globs, files: plain text, markdown, rst, source code, jsonl, json,
    # parquet (and .arrow / save_to_disk directories when `datasets` is installed)
    python data_pipelines/train_tokenizer.py --input 'corpus/*.jsonl' --text-field text \
        --vocab-size 32000 --out tokenizers/corpus32k
    python data_pipelines/train_tokenizer.py --input /usr/lib/python3.11/ --vocab-size 8000 --out tok/py
    # a task's tokenizer (its alphabet as user-defined symbols; gsm: BPE on generated problems)
    python data_pipelines/train_tokenizer.py --task rule110 --out tokenizers/
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse_params, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="model path prefix (text) or directory (--task)")
    p.add_argument("--task", help="build the tokenizer of this task (rule110, depo, gsm) into --out")
    p.add_argument("--input", action="append", help="corpus file / glob / directory (repeatable)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/json/parquet rows")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--no-byte-fallback", action="store_true",
                   help="characters outside the vocabulary become <unk> instead of their UTF-8 bytes")
    p.add_argument("--no-split-digits", action="store_true", help="let numbers merge into multi-digit pieces")
    p.add_argument("--normalize-whitespace", action="store_true",
                   help="sentencepiece's defaults instead of keeping text intact: NFKC, newlines and runs of "
                        "spaces collapsed (code and formatted maths then do not round-trip)")
    p.add_argument("--user-symbols", nargs="*", default=[], help="extra user-defined symbols (one piece each)")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--max-chars", type=int, default=200_000_000, help="read at most this much text")
    p.add_argument("--param", action="append", help="task tokenizer parameter key=value (gsm: vocab_size=...)")
    a = p.parse_args(argv)
    t0 = time.time()
    if a.task:
        from megasleep.data.tasks import get_task

        tok = get_task(a.task).make_task_tokenizer(a.out, **parse_params(a.param))
    else:
        if not a.input:
            p.error("--input is required (or --task)")
        from megasleep.data.corpus import print_report
        from megasleep.data.tokenizer import train_tokenizer

        stats: dict = {}
        tok = train_tokenizer(a.out, corpus=a.input, text_field=a.text_field, vocab_size=a.vocab_size,
                              model_type=a.model_type, keep_whitespace=not a.normalize_whitespace,
                              byte_fallback=not a.no_byte_fallback, split_digits=not a.no_split_digits,
                              user_defined_symbols=a.user_symbols, character_coverage=a.character_coverage,
                              max_chars=a.max_chars, stats=stats)
        print_report(stats)
    print(f"wrote {tok.path}  vocab_size={tok.vocab_size}  hash={tok.hash}  ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    run_cli(main)
