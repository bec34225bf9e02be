#!/usr/bin/env python
"""Convert a local copy of the official GSM-Infinite data (parquet / jsonl) into our GSM shards.

    # e.g. files downloaded from the Hugging Face dataset InfiniAILab/gsm_infinite_medium_8k
    python data_pipelines/import_gsm_infinite.py --input 'gsm_infinite_medium_8k/data/ops_*.parquet' \
        --tokenizer data/gsm/tokenizer/gsm.model --out data/gsm-official/medium_8k

Columns used: problem, question, solution ("... Answer: N."), op; id/template/mode/length/d go to meta.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True, help="parquet / jsonl file or glob (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--max-len", type=int, help="skip (and count) problems longer than this many tokens")
    p.add_argument("--split", default="official", help="name used in sample keys and the manifest")
    p.add_argument("--max-skip-fraction", type=float, default=0.05)
    p.add_argument("--compress", action="store_true",
                   help="write .tar.gz shards (deterministic gzip; much smaller for short samples)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)

    from megasleep.data.shards import import_gsm_official

    t0 = time.time()
    m = import_gsm_official(a.input, a.out, a.tokenizer, shard_size=a.shard_size, max_len=a.max_len,
                            split=a.split, progress=not a.no_progress, max_skip_fraction=a.max_skip_fraction,
                            compress=a.compress)
    print(f"{m['rows']} rows -> {m['num_samples']} samples ({m['skipped_rows']} skipped), per op "
          f"{m['difficulty']['histogram']} -> {Path(a.out) / 'manifest.json'}  ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    run_cli(main)
