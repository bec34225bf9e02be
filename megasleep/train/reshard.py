"""Resume a checkpoint saved by R ranks on R' ranks (DeepSpeed universal checkpointing).

ZeRO 1-3 save each rank's slice of the flat fp32 master weights and optimizer moments; those slices
only fit the world size that wrote them. DeepSpeed's answer is the *universal checkpoint*:
``deepspeed.checkpoint.ds_to_universal`` cuts the slices back into one folder per parameter
(``zero/<name>/fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt``), and an engine configured with
``load_universal_checkpoint`` re-partitions those for its own world size. We use both unchanged:

1. rank 0 converts ``<ckpt>/<tag>`` into ``<run ckpt dir>/<tag>.universal`` (written to a temporary
   folder and renamed, so a crash leaves no half-converted copy) unless a converted copy is already
   there (``python -m megasleep.train.reshard TAG_DIR`` converts ahead of time, next to the source);
2. every rank loads it with ``load_universal_checkpoint`` switched on for that one call;
3. the copy this run made is deleted once every rank has loaded it.

ZeRO-0 checkpoints need none of this: the whole model and optimizer state sit in
``mp_rank_00_model_states.pt``, which any world size loads. The step, the learning-rate schedule (a
pure function of the step) and the random-N sampler (a function of seed and step) carry over as they
are. The data position is defined in docs/checkpoint.md ("Resharding").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megasleep.checkpoint.errors import CheckpointError

SUFFIX = ".universal"
DONE = "megasleep-universal.json"


class ReshardError(CheckpointError):
    """A checkpoint cannot be resumed at this world size."""


def universal_tag(tag: str) -> str:
    return tag + SUFFIX


def converted(path: Path) -> bool:
    return (path / DONE).is_file()


def convert_to_universal(tag_dir: Path, out_dir: Path) -> Path:
    """DeepSpeed's ds_to_universal on one tag directory -> ``out_dir`` (atomic: tmp folder + rename)."""
    from deepspeed.checkpoint import ds_to_universal

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    if converted(out_dir):
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # pre-existing checkpoints lack DeepSpeed's info key
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):  # it prints every parameter
            ds_to_universal.main(args)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReshardError(f"{tag_dir}: DeepSpeed's universal-checkpoint conversion failed: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    (tmp.parent / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer: we pass tags
    (tmp / DONE).write_text(json.dumps({"source": str(tag_dir.resolve()),
                                        "seconds": round(time.perf_counter() - t0, 2)}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_resharded(engine, src_dir: Path, tag: str, work_dir: Path, rank: int, barrier,
                   load_optimizer: bool = True, trust: bool = False) -> dict[str, Any]:
    """Load ``src_dir/tag`` (any world size, ZeRO 1-3) into ``engine``; returns DeepSpeed's client state.

    The converted copy comes from next to the source if someone converted it ahead of time (then it
    is verified weights-only like the source), else it is made in ``work_dir`` by rank 0 (the others
    wait) from the verified source and removed after every rank has loaded it."""
    from megasleep.checkpoint.trust import verify_checkpoint

    pre = Path(src_dir) / universal_tag(tag)
    made = not converted(pre)
    if not made:
        verify_checkpoint(pre, trust)
    root = Path(work_dir) if made else Path(src_dir)
    error = None
    if made and rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            convert_to_universal(Path(src_dir) / tag, root / universal_tag(tag))
        except (ReshardError, OSError) as exc:  # raised after the barrier: the other ranks must not hang
            error = exc
    barrier()
    if error is not None:
        raise error
    if not converted(root / universal_tag(tag)):
        raise ReshardError(f"{root / universal_tag(tag)}: the universal copy of {Path(src_dir) / tag} is missing "
                           "(rank 0 failed to convert it, or this rank cannot see rank 0's file system)")
    groups = _base_param_groups(engine)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = True  # an engine option: DeepSpeed reads it on every load_checkpoint
    try:
        path, client = engine.load_checkpoint(str(root), tag=universal_tag(tag), load_optimizer_states=load_optimizer,
                                              load_lr_scheduler_states=False)
    finally:
        cfg.load_universal_checkpoint = before
    if path is None:
        raise ReshardError(f"{root / universal_tag(tag)}: DeepSpeed could not load the universal checkpoint")
    _repair_zero3_universal_state(engine, groups, hyper)
    barrier()
    if made and rank == 0:
        shutil.rmtree(root / universal_tag(tag), ignore_errors=True)
    return client or {}


def _repair_zero3_universal_state(engine, groups: list[dict], hyper: list[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (each measured to change the resumed losses).

    * it gives every parameter group the first group's hyperparameters (the no-decay group came back
      with weight_decay=0.01): ours come from the experiment config, so we put them back;
    * it stores ONE ``step`` tensor object in the state of every sub-group; torch's AdamW increments
      ``step`` in place, so each optimizer step advanced it once per sub-group and the bias correction
      drifted: each sub-group gets its own copy.
    """
    for g, h in zip(groups, hyper):
        g.update(h)
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    for state in base.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.clone()


def _base_param_groups(engine) -> list[dict]:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt).param_groups


def old_rank_for(rank: int, saved_world: int) -> int:
    """Which saved rank's file (RNG states) a rank of the new world starts from."""
    return rank % saved_world


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megasleep.train.reshard",
                                description="Convert a checkpoint to DeepSpeed's universal format ahead of a "
                                            "resume at another world size (written next to it as <tag>.universal).")
    p.add_argument("tag_dir", help="one checkpoint directory, e.g. runs/x/checkpoints/step_00001000")
    p.add_argument("--trust-checkpoint", action="store_true", help="skip the weights-only check of its files")
    a = p.parse_args(argv)
    from megasleep.checkpoint.trust import UntrustedCheckpoint, verify_checkpoint

    tag_dir = Path(a.tag_dir)
    try:
        if not (tag_dir / "megasleep.json").is_file():
            raise ReshardError(f"{tag_dir}: not a complete megasleep checkpoint (no megasleep.json)")
        verify_checkpoint(tag_dir, a.trust_checkpoint)
        out = convert_to_universal(tag_dir, tag_dir.with_name(universal_tag(tag_dir.name)))
    except (ReshardError, UntrustedCheckpoint) as exc:
        print(f"reshard: error: {exc}", file=sys.stderr)
        return 2
    print(f"universal checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
