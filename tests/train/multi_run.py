"""Run several short trainings one after another in ONE process group (saves the interpreter,
import and rendezvous start-up per run). Used by the parity tests under torchrun:

    torchrun --nproc-per-node 2 tests/train/multi_run.py OUT.json RUN_ROOT NAME:override,override ...

Each NAME gets run_dir RUN_ROOT/NAME; rank 0 writes {NAME: [loss of every step]} to OUT.json.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from megasleep.train.config import load_experiment
    from megasleep.train.trainer import Trainer, shutdown_distributed

    out, root, specs = argv[0], argv[1], argv[2:]
    results: dict[str, list[float]] = {}
    rank = 0
    try:
        for spec in specs:
            name, _, overrides = spec.partition(":")
            cfg = load_experiment(None, [f"run_dir={root}/{name}", *filter(None, overrides.split(","))])
            trainer = Trainer(cfg)
            rank = trainer.rank
            trainer.train()
            trainer.metrics.close()
            results[name] = [h["loss"] for h in trainer.history]
    finally:
        shutdown_distributed()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
