"""Data stack: sentencepiece tokenizers, seeded task generators, WebDataset shards, resumable loader.

Importing this package is cheap (numpy only); torch and webdataset are imported by the loader and
the shard writers when they are used. See ``docs/data.md`` for the sample format and the contracts.

Public entry points::

    from megasleep.data.tokenizer import train_tokenizer, load_tokenizer, Tokenizer
    from megasleep.data.tasks import get_task, TASKS
    from megasleep.data.shards import build_task_split, build_text_dataset
    from megasleep.data.manifest import read_manifest, check_tokenizer_hash, resolve_shards
    from megasleep.data.loader import LoaderConfig, build_loader, ResumableLoader
"""

from __future__ import annotations

from megasleep.data.errors import (
    BadDataError,
    DataError,
    MissingShardError,
    TokenizerMismatchError,
)

__all__ = [
    "BadDataError",
    "DataError",
    "MissingShardError",
    "TokenizerMismatchError",
]
