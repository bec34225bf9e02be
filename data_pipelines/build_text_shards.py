#!/usr/bin/env python
"""Tokenize a corpus (directories, globs, files: text, markdown, code, jsonl, json, parquet) into
WebDataset shards of T-token sequences.

    python data_pipelines/build_text_shards.py --input 'corpus/*.jsonl' --text-field text \
        --tokenizer tokenizers/corpus32k.model --seq-len 8192 --out data/corpus-8k
    # one document per sample, cut into pieces of at most T tokens:
    python data_pipelines/build_text_shards.py --input books/ --mode cut --seq-len 16384 ...

Every document (a whole text file, however long, or a row) is <s> ... </s>; doc_starts records where
documents start inside a sequence. What was read and what was skipped (and why) goes to stderr.
Writes OUT/shard-NNNNNN.tar + OUT/manifest.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_workers, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, help="file / glob / directory (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per sequence (T)")
    p.add_argument("--mode", choices=["pack", "cut"], default="pack",
                   help="pack: concatenate documents into sequences of exactly T; cut: one document per sample")
    p.add_argument("--text-field", default="text", help="field of jsonl/json/parquet rows (dotted for nested)")
    p.add_argument("--txt-mode", choices=["file", "paragraph", "line"], default="file",
                   help="what a document is in plain-text files (default: the whole file)")
    p.add_argument("--shard-size", type=int, default=1000, help="sequences per shard")
    p.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes")
    p.add_argument("--min-tokens", type=int, default=2, help="drop shorter pieces")
    p.add_argument("--max-docs", type=int, help="stop after this many documents")
    p.add_argument("--name", default="text", help="split name used in sample keys and the manifest")
    p.add_argument("--compress", action="store_true",
                   help="write .tar.gz shards (deterministic gzip; much smaller for short samples)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from megasleep.data.corpus import print_report
    from megasleep.data.shards import build_text_dataset

    t0 = time.time()
    stats: dict = {}
    m = build_text_dataset(a.input, a.out, a.tokenizer, a.seq_len, mode=a.mode, text_field=a.text_field,
                           txt_mode=a.txt_mode, shard_size=a.shard_size, workers=a.workers, min_tokens=a.min_tokens,
                           max_docs=a.max_docs, progress=not a.no_progress, name=a.name,
                           compress=a.compress, stats=stats)
    print_report(stats)
    print(f"{m['documents']} documents -> {m['num_samples']} sequences, {m['num_tokens']} tokens, "
          f"{len(m['shards'])} shards -> {Path(a.out) / 'manifest.json'}  ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    run_cli(main)
