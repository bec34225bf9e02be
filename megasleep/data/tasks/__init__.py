"""Task registry: ``get_task("rule110" | "depo" | "gsm" | "pointer") -> TaskSpec``.

Example::

    from megasleep.data.tasks import get_task
    task = get_task("rule110")
    tok = task.make_task_tokenizer("tokenizers/")          # sentencepiece model of the task alphabet
    s = task.sample(seed=0, split="train", index=7, difficulties="1-32", tokenizer=tok)
    # or, with your own generator state:
    s = task.make_sample(np.random.default_rng(0), 32, tok, **task.defaults)
"""

from __future__ import annotations

from megasleep.data.tasks import depo, gsm, pointer, rule110
from megasleep.data.tasks.base import TaskSpec, parse_difficulty, sample_rng, split_id

TASKS: dict[str, TaskSpec] = {
    m.NAME: TaskSpec(name=m.NAME, version=m.VERSION, module=m, defaults=dict(m.DEFAULTS), difficulty_name=m.DIFFICULTY)
    for m in (rule110, depo, gsm, pointer)
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}") from None


def make_task_tokenizer(name: str, out_dir, **params):
    """Build task ``name``'s sentencepiece model into ``out_dir/<name>.model``; returns the Tokenizer."""
    return get_task(name).make_task_tokenizer(out_dir, **params)


__all__ = ["TASKS", "TaskSpec", "get_task", "make_task_tokenizer", "parse_difficulty", "sample_rng", "split_id"]
