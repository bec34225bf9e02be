"""Count ZeRO-3's parameter all-gathers per training step (the ZeRO-3 tests run it under torchrun):

    torchrun --nproc-per-node 2 tests/train/zero3_gathers.py OUT_DIR RUNS_JSON override ...

RUNS_JSON is a list of {"name", "run_dir", "overrides"}: the runs train one after another in the same
two processes (one process group, so the test pays torchrun's and DeepSpeed's start-up once), each with
the common overrides followed by its own.

Every all-gather DeepSpeed issues goes through ``deepspeed.comm.all_gather_into_tensor`` (or its
``all_gather`` fallback); both are wrapped to count calls and gathered elements. Rank 0 writes
OUT_DIR/<name>.json = {"steps": [{"calls": c, "numel": n}, ...], "params": parameters of the model,
"losses": [...]} per run.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import deepspeed.comm.comm as ds_comm

    from megasleep.train.config import load_experiment
    from megasleep.train.trainer import Trainer, shutdown_distributed

    counts = {"calls": 0, "numel": 0}

    def counted(fn, size):
        def wrapper(*args, **kwargs):
            counts["calls"] += 1
            counts["numel"] += size(*args, **kwargs)
            return fn(*args, **kwargs)
        return wrapper

    ds_comm.all_gather_into_tensor = counted(ds_comm.all_gather_into_tensor, lambda out, *a, **k: out.numel())
    ds_comm.all_gather = counted(ds_comm.all_gather, lambda outs, *a, **k: sum(t.numel() for t in outs))

    out_dir, runs, common = argv[0], json.loads(argv[1]), argv[2:]
    try:
        for run in runs:
            trainer = Trainer(load_experiment(None, [f"run_dir={run['run_dir']}", *common, *run["overrides"]]))
            steps = []
            step = trainer.train_step

            def counted_step(step=step, steps=steps):
                before = dict(counts)
                rec = step()
                steps.append({k: counts[k] - before[k] for k in counts})
                return rec

            trainer.train_step = counted_step
            trainer.train()
            if trainer.rank == 0:
                with open(f"{out_dir}/{run['name']}.json", "w") as f:
                    json.dump({"steps": steps, "params": trainer.flops.params,
                               "losses": [h["loss"] for h in trainer.history]}, f)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
