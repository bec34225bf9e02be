"""Golden losses of the tiny config (torchtitan's habit): a silent change of the model, the sleep
loop, the data generator, the optimizer or the trainer moves these numbers.

    python tests/train/golden.py            # run the reference config and compare with the file
    python tests/train/golden.py --update   # rewrite the file (only after an intended change; say why)

The file holds one "step loss" line per step, after '#' comment lines that record the command.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.train.helpers import FAST, losses, run_train  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "losses" / "tiny-demo.txt"
# CPU fp32 is bitwise reproducible on one machine; other CPUs / BLAS builds differ in the last bits,
# which after 10 Adam steps stays far below this. A real regression moves the loss by >> 1e-3.
ATOL = 5e-4


def read_golden(path: Path = GOLDEN) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            step, loss = line.split()
            out[int(step)] = float(loss)
    return out


def write_golden(got: dict[int, float], path: Path = GOLDEN) -> None:
    import torch

    import megasleep

    head = [
        "# megasleep golden losses: configs/experiments/tiny-demo.yaml, one process, ZeRO-1, fp32 CPU",
        "# overrides: " + " ".join(FAST),
        f"# produced with megasleep {megasleep.__version__}, torch {torch.__version__}",
        "# regenerate (after an intended change only): python tests/train/golden.py --update",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(head + [f"{s} {got[s]!r}" for s in sorted(got)]) + "\n")


def compare(got: dict[int, float], want: dict[int, float], atol: float = ATOL) -> list[str]:
    problems = []
    if sorted(got) != sorted(want):
        problems.append(f"steps differ: got {sorted(got)}, golden {sorted(want)}")
    for s in sorted(set(got) & set(want)):
        if abs(got[s] - want[s]) > atol:
            problems.append(f"step {s}: loss {got[s]:.6f} vs golden {want[s]:.6f} (diff {got[s] - want[s]:+.2e})")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_train(*FAST, f"run_dir={tmp}/run")
        got = losses(Path(tmp) / "run")
    if a.update:
        write_golden(got)
        print(f"wrote {GOLDEN}")
        return 0
    problems = compare(got, read_golden())
    print("\n".join(problems) or f"OK: {len(got)} steps match {GOLDEN}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
