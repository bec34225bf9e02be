"""Exceptions of the data stack (all importable without torch)."""

from __future__ import annotations


class DataError(RuntimeError):
    """Base class of the data stack's errors."""


class MissingShardError(DataError, FileNotFoundError):
    """A shard named by a manifest / pattern does not exist, or a glob matched nothing."""


class TokenizerMismatchError(DataError, ValueError):
    """A dataset was tokenized with a different tokenizer than the one the model uses."""


class BadDataError(DataError):
    """Too many corrupt shards or malformed samples (past ``max_bad_fraction``); names the shards."""

    def __init__(self, message: str):  # single-arg constructor so DataLoader workers can re-raise it
        super().__init__(message)


class ShardMismatchError(BadDataError):
    """A shard differs from what its manifest records (size, sha256, sample count), or the manifest's
    totals do not add up; the message names the manifest and the shards."""
