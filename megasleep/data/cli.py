"""`megasleep data`: build datasets and check them.

    megasleep data text --input DIR --out DIR [--vocab-size V] [--seq-len T]   # tokenizer + shards + config
    megasleep data verify DIR [DIR ...]                                        # sizes, sha256, counts
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    t = sub.add_parser("text", help="a folder / glob of text -> tokenizer, train/val shards, experiment.yaml",
                       description="Tokenizer (text kept intact), train/val shards of --seq-len tokens with "
                                   "documents packed whole, and OUT/experiment.yaml with vocab_size filled in.")
    t.add_argument("--input", action="append", required=True,
                   help="directory (walked), glob or file; repeatable. Text, markdown, rst, source code, "
                        "jsonl / json / parquet rows (--text-field), .arrow and save_to_disk dirs via `datasets`")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=8000)
    t.add_argument("--seq-len", type=int, default=4096, help="tokens per training sequence (T)")
    t.add_argument("--window", type=int, help="attention window L of the config (default: min(2048, T))")
    t.add_argument("--passes", type=int, default=2, help="sleep passes N of the config")
    t.add_argument("--val-every", type=int, default=50, help="every k-th document goes to validation")
    t.add_argument("--model", default="configs/models/tiny.yaml", help="model config the experiment starts from")
    t.add_argument("--steps", type=int, default=200, help="train.steps of the config")
    t.add_argument("--batch-size", type=int, default=2, help="global batch size of the config")
    t.add_argument("--text-field", default="text", help="field of jsonl / json / parquet rows (dotted for nested)")
    t.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    t.add_argument("--no-progress", action="store_true")
    v = sub.add_parser("verify", help="check shard sizes, sha256 and the manifest's counts",
                       description="Check every shard of each dataset against its manifest: size and sha256, "
                                   "and (with --samples) the sample counts and totals read from the shards.")
    v.add_argument("datasets", nargs="+", help="dataset directories (holding manifest.json) or manifest files")
    v.add_argument("--samples", action="store_true",
                   help="also read every sample: counts per shard, totals, samples without a training target")


def main(args) -> int:
    if args.data_command == "text":
        from megasleep.data.text_pipeline import build_text_experiment

        build_text_experiment(args.input, args.out, vocab_size=args.vocab_size, seq_len=args.seq_len,
                              window=args.window, passes=args.passes, val_every=args.val_every, model=args.model,
                              text_field=args.text_field, steps=args.steps, batch_size=args.batch_size,
                              workers=args.workers, progress=not args.no_progress)
        return 0
    from megasleep.data.manifest import verify_dataset

    for d in args.datasets:
        print(verify_dataset(d, read_samples=args.samples))
    return 0
