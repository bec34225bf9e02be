"""The errors every checkpoint reader raises: one line naming the file / tensor / key and why."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be used (missing, incomplete, or saved by a different world size)."""


class PretrainedError(ValueError):
    """A checkpoint directory cannot be loaded (the message says which file / tensor and why)."""


class MissingCheckpointFileError(PretrainedError, FileNotFoundError):
    """The directory lacks config.json, the weights, or a file the config points to."""


class WeightsMismatchError(PretrainedError):
    """The weights do not fit the config: missing / unexpected tensors or wrong shapes (all named)."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


class UnsafeCheckpointError(PretrainedError):
    """A pickled weights file that ``torch.load(weights_only=True)`` refuses (it would run code)."""


class UnsupportedModelError(PretrainedError):
    """A foreign checkpoint whose family or setting megasleep cannot represent faithfully."""


__all__ = ["CheckpointError", "MissingCheckpointFileError", "PretrainedError", "UnsafeCheckpointError", "UnsupportedModelError",
           "WeightsMismatchError"]
