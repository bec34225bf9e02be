"""Where the trainer's batches come from.

Two sources, one interface (:class:`StepData`): ``batches(step) -> list of micro-batches`` (this
rank's share of the global batch of that step), ``state_dict()`` / ``load_state_dict()``.

* ``task``: samples generated on the fly by a task generator (``megasleep.data.tasks``). Sample
  ``i`` of the run is ``task.sample(seed, "train", i, ...)``, and step ``s`` of a run with global
  batch ``G`` uses samples ``[s G, (s+1) G)`` split into consecutive micro-batches by
  (accumulation index, rank). So the data of a step does not depend on the number of ranks or the
  accumulation split (this is what makes 1-process and 2-process runs comparable), and the state of
  the stream is the step number alone.
* ``shards``: the resumable WebDataset loader of ``megasleep.data.loader`` (its state goes into
  each rank's checkpoint file).

A micro-batch is ``dict(input_ids [B,T] long, loss_mask [B,T] bool, doc_ids [B,T] long, meta list)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megasleep.config import ConfigError
from megasleep.data.sample import collate


def manifest_tokenizer(paths) -> Any:
    """The tokenizer a dataset's manifest names (None if it names none or the file is gone)."""
    from megasleep.data.manifest import read_manifest
    from megasleep.data.tokenizer import load_tokenizer

    first = paths[0] if isinstance(paths, list) else paths
    p = Path(first)
    if not p.is_dir():
        return None
    try:
        m = read_manifest(p)
    except Exception:
        return None
    tok = (m.get("tokenizer") or {}).get("path")
    if not tok:
        return None
    cand = [Path(tok), Path(m["_dir"]) / tok, Path(m["_dir"]).parent / "tokenizer" / Path(tok).name]
    for c in cand:
        if c.is_file():
            return load_tokenizer(c)
    return None


def task_tokenizer(task: str, directory: Path, rank: int, barrier) -> Any:
    """The task's own sentencepiece tokenizer, built once by rank 0 into ``directory``."""
    from megasleep.data.tasks import get_task
    from megasleep.data.tokenizer import load_tokenizer

    spec = get_task(task)
    path = directory / f"{task}.model"
    if rank == 0 and not path.exists():
        spec.make_task_tokenizer(directory)
    barrier()
    return load_tokenizer(path)


class StepData:
    """Interface of a training data source."""

    def batches(self, step: int) -> list[dict]:  # pragma: no cover - interface
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TaskStream(StepData):
    """On-the-fly task samples; see the module docstring for the index layout."""

    def __init__(self, task: str, tokenizer, *, seed: int, split: str, difficulty, params: dict,
                 micro_batch: int, global_batch: int, rank: int, world: int):
        from megasleep.data.tasks import get_task

        self.spec = get_task(task)
        self.params = self.spec.params(**params)  # raises on unknown parameters
        self.tokenizer, self.seed, self.split, self.difficulty = tokenizer, seed, split, difficulty
        self.micro, self.global_batch, self.rank, self.world = micro_batch, global_batch, rank, world
        if global_batch % (micro_batch * world):
            raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by "
                              f"micro_batch_size={micro_batch} x world_size={world}")
        self.accum = global_batch // (micro_batch * world)

    def sample(self, index: int) -> dict:
        return self.spec.sample(self.seed, self.split, index, self.difficulty, self.tokenizer, **self.params)

    def batches(self, step: int) -> list[dict]:
        out = []
        for a in range(self.accum):
            first = step * self.global_batch + (a * self.world + self.rank) * self.micro
            out.append(as_batch(collate([self.sample(first + j) for j in range(self.micro)], self.tokenizer.pad_id)))
        return out

    def state_dict(self) -> dict:
        return {"kind": "task", "seed": self.seed, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "task":
            raise ConfigError(f"checkpoint data state is {state.get('kind')!r}, this run reads 'task' data")
        if state.get("seed") != self.seed or state.get("global_batch") != self.global_batch:
            raise ConfigError(
                f"checkpoint was trained with data.task.seed={state.get('seed')} and global batch "
                f"{state.get('global_batch')}; this run has {self.seed} and {self.global_batch} — a resumed "
                "run would not see the samples the uninterrupted run would have")


def task_eval_samples(task: str, tokenizer, *, seed: int, difficulty, params: dict, n: int) -> list[dict]:
    """``n`` validation samples, difficulties taken in turn (so every bucket gets n / #difficulties)."""
    from megasleep.data.tasks import get_task, parse_difficulty

    spec = get_task(task)
    diffs = parse_difficulty(difficulty)
    params = spec.params(**params)
    return [spec.sample(seed, "val", i, [diffs[i % len(diffs)]], tokenizer, **params) for i in range(n)]


class ShardStream(StepData):
    """The resumable WebDataset loader of megasleep.data (one iterator per rank)."""

    def __init__(self, data_cfg, *, micro_batch: int, global_batch: int, rank: int, world: int, seed: int,
                 split: str = "train", tokenizer_hash: str | None = None):
        from megasleep.data.loader import build_loader

        if global_batch % (micro_batch * world):
            raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by "
                              f"micro_batch_size={micro_batch} x world_size={world}")
        self.accum = global_batch // (micro_batch * world)
        self.loader = build_loader(loader_config(data_cfg, split, micro_batch, seed, tokenizer_hash), rank, world)
        self._it = None

    def batches(self, step: int) -> list[dict]:
        if self._it is None:
            self._it = iter(self.loader)
        out = []
        for _ in range(self.accum):
            try:
                b = next(self._it)
            except StopIteration:  # a finite loader ran out: start its next epochs
                self._it = iter(self.loader)
                try:
                    b = next(self._it)
                except StopIteration:
                    raise ConfigError("the data loader yields no batch (empty dataset?)") from None
            out.append(as_batch(b))
        return out

    def state_dict(self) -> dict:
        return {"kind": "shards", "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "shards":
            raise ConfigError(f"checkpoint data state is {state.get('kind')!r}, this run reads shards")
        self.loader.load_state_dict(state["loader"])
        self._it = None

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close:
            close()


def as_batch(b: dict) -> dict:
    """A collated batch (:func:`megasleep.data.sample.collate`, numpy or torch) as long / bool tensors
    (doc_ids made if absent)."""
    ids = torch.as_tensor(b["input_ids"]).long()
    mask = torch.as_tensor(b["loss_mask"]).bool()
    docs = b.get("doc_ids")
    docs = torch.zeros_like(ids) if docs is None else torch.as_tensor(docs).long()
    return {"input_ids": ids, "loss_mask": mask, "doc_ids": docs, "meta": list(b.get("meta") or [{}] * len(ids))}


def loader_config(data_cfg, split: str, batch_size: int, seed: int, tokenizer_hash: str | None = None):
    """megasleep.data.loader.LoaderConfig from our data section; ``data.loader`` entries override, and
    errors name ``data.loader.<key>``."""
    from megasleep.config import validate
    from megasleep.data.loader import LoaderConfig

    paths = data_cfg.train if split == "train" else data_cfg.val
    values: dict[str, Any] = {"datasets": paths, "batch_size": batch_size, "seed": seed,
                              "tokenizer_hash": tokenizer_hash}
    values.update(data_cfg.loader.model_dump(exclude_unset=True))
    if split != "train":  # evaluation: one pass, fixed order
        values.update(shuffle_buffer=0, shuffle_shards=False, epochs=1, drop_last=False)
    values["batch_size"] = batch_size
    return validate(LoaderConfig, values, "experiment config", prefix="data.loader")
