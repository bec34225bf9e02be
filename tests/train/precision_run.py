"""Train a few steps of the demo and report what DeepSpeed's engine holds (the precision tests run it as
a subprocess, under torchrun or plain python):

    python tests/train/precision_run.py OUT.json RUN_DIR override ...

Rank 0 writes {"dtypes": {param: dtype}, "masters": [dtype of each fp32 master partition], "losses": [...],
"bf16_exact": {param: whether every value is a bf16 number after training}, "ds": the DeepSpeed JSON}.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:

    from megasleep.train.config import load_experiment
    from megasleep.train.trainer import Trainer, shutdown_distributed

    out, run_dir, overrides = argv[0], argv[1], argv[2:]
    cfg = load_experiment(None, [f"run_dir={run_dir}", *overrides])
    trainer = Trainer(cfg)
    try:
        dtypes = {n: str(p.dtype) for n, p in trainer.model.named_parameters()}
        opt = trainer.engine.optimizer
        masters = [str(t.dtype) for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")
                   for t in getattr(opt, name, [])]
        trainer.train()
        # (ZeRO-3: a partitioned parameter is empty on the module; the gathered external ones are checked)
        exact = {n: bool((p.detach().float() == p.detach().bfloat16().float()).all())
                 for n, p in trainer.model.named_parameters() if p.numel()}
        if trainer.rank == 0:
            with open(out, "w") as f:
                json.dump({"dtypes": dtypes, "masters": masters, "losses": [h["loss"] for h in trainer.history],
                           "bf16_exact": exact, "ds": trainer.ds_config}, f, default=str)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
