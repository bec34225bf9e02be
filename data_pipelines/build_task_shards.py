#!/usr/bin/env python
"""Generate a synthetic task dataset (train / val / test with disjoint seeds) as WebDataset shards.

    python data_pipelines/build_task_shards.py --task rule110 --out data/rule110 \
        --train 1000000 --val 10000 --test 10000 --difficulty 32 --seed 0
    python data_pipelines/build_task_shards.py --task depo --out data/depo \
        --train 200000 --val 2000 --test 2000 --difficulty 1-16 --eval-difficulty 1,2,4,8,16
    python data_pipelines/build_task_shards.py --task gsm --out data/gsm \
        --train 100000 --val 1000 --test 1000 --difficulty 1-8 --param length_min=2000 --param length_max=3300

Writes OUT/<split>/shard-NNNNNN.tar + OUT/<split>/manifest.json and an index OUT/manifest.json.
Without --tokenizer the task's tokenizer is built into OUT/tokenizer/ (or reused if present).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_workers, parse_params, run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=["rule110", "depo", "gsm"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tokenizer", help="sentencepiece .model (default: build the task's into OUT/tokenizer/)")
    p.add_argument("--train", type=int, default=0, help="number of training samples")
    p.add_argument("--val", type=int, default=0)
    p.add_argument("--test", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", required=True,
                   help="difficulty values drawn uniformly per sample: '32', '1-16', '1,2,4,8,16' (rule110: t, depo: k, gsm: ops)")
    p.add_argument("--eval-difficulty", help="difficulties for val/test (default: --difficulty)")
    p.add_argument("--param", action="append", help="generator parameter key=value (repeatable), e.g. n_max=75")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--compress", action="store_true",
                   help="write .tar.gz shards (deterministic gzip; much smaller for short samples)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-check-disjoint", action="store_true", help="skip the split-overlap check (huge datasets)")
    a = p.parse_args(argv)

    from megasleep.data.shards import build_task_dataset
    from megasleep.data.tasks import get_task

    out = Path(a.out)
    tok_path = a.tokenizer
    if tok_path is None:
        cand = out / "tokenizer" / f"{a.task}.model"
        tok_path = str(cand) if cand.exists() else get_task(a.task).make_task_tokenizer(out / "tokenizer").path
    counts = {"train": a.train, "val": a.val, "test": a.test}
    if not any(counts.values()):
        p.error("give at least one of --train / --val / --test")
    diffs = {"train": a.difficulty, "val": a.eval_difficulty or a.difficulty, "test": a.eval_difficulty or a.difficulty}
    t0 = time.time()
    manifests = build_task_dataset(a.task, out, counts, a.seed, diffs, tok_path, params=parse_params(a.param),
                                   shard_size=a.shard_size, workers=a.workers, progress=not a.no_progress,
                                   check_disjoint=not a.no_check_disjoint, compress=a.compress)
    for split, m in manifests.items():
        print(f"{split}: {m['num_samples']} samples, {m['num_tokens']} tokens, {len(m['shards'])} shards "
              f"-> {out / split / 'manifest.json'}")
    print(f"tokenizer {tok_path} hash={next(iter(manifests.values()))['tokenizer']['hash']}  ({time.time() - t0:.1f}s)")


if __name__ == "__main__":
    run_cli(main)
