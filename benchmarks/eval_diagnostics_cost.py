"""What do the collapse diagnostics add to the trainer's evaluation? (``eval.diagnostics``)

The tiny demo experiment's validator (256 Rule 110 samples, batch 64, N in 1, 2, 4) on a fresh model,
scored without and with the diagnostics, interleaved, on this machine's CPU; prints the time of each
and their ratio per repeat. The diagnostics run on ``megasleep.train.validate.DIAG_SAMPLES`` samples
per N (two extra forwards and per-sample spectra each).

    OMP_NUM_THREADS=1 python benchmarks/eval_diagnostics_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from megasleep.data.tasks import get_task
from megasleep.eval.harness import direct_forward
from megasleep.models import HybridLM
from megasleep.train.config import load_experiment
from megasleep.train.validate import DIAG_SAMPLES, Validator, validation_batches


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = load_experiment(None, ["eval.eval_passes=[1,2,4]", "eval.samples=256", "eval.batch_size=64"])
    with tempfile.TemporaryDirectory() as tmp:
        tok = get_task(cfg.data.task.name).make_task_tokenizer(Path(tmp) / "tok")
        torch.manual_seed(0)
        model = HybridLM(cfg.model_cfg).eval()
        batches, task = validation_batches(cfg, tok, 0, 1)
        fwd, cpu = direct_forward(model), torch.device("cpu")
        plain = Validator(fwd, batches, cfg.sleep, cfg.eval.eval_passes, 0, cpu, task)
        diag = Validator(fwd, batches, cfg.sleep, cfg.eval.eval_passes, 0, cpu, task, model=model, pad_id=tok.pad_id)
        print(f"tiny demo validator: {sum(len(i) for i, _ in batches)} samples, N in {cfg.eval.eval_passes}, "
              f"diagnostics on {DIAG_SAMPLES} samples per N")
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            plain.scores()
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            diag.scores()
            b = time.perf_counter() - t0
            print(f"repeat {rep}: without diagnostics {a:.2f} s, with {b:.2f} s, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
