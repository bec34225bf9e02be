"""``MegasleepConfig``: transformers' view of a megasleep export's config.json (model_type "megasleep").
Light on purpose (only transformers' configuration module): it is registered with ``AutoConfig`` as soon
as transformers' auto classes are imported (megasleep/checkpoint/autoregister.py)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from megasleep.models.config import ModelConfig

# the base class's own constructor arguments (the rest of config.json is kept as attributes)
_BASE_ARGS = ("transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
              "id2label", "label2id", "problem_type")


class MegasleepConfig(PretrainedConfig):
    model_type = "megasleep"

    def __init__(self, **kwargs: Any):
        base = {k: kwargs.pop(k) for k in _BASE_ARGS if k in kwargs}
        kwargs.pop("model_type", None)
        tie = bool(kwargs.get("tie_embeddings", True))
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("tie_word_embeddings", "use_cache")}
        super().__init__(**base)
        for k, v in extra.items():
            setattr(self, k, v)
        self.tie_word_embeddings = tie
        self.use_cache = False  # the streaming engine keeps its own caches

    def model_config(self) -> ModelConfig:
        from megasleep.config import validate

        fields = {k: getattr(self, k) for k in ModelConfig.model_fields if hasattr(self, k)}
        return validate(ModelConfig, fields, f"{getattr(self, '_name_or_path', '') or '<MegasleepConfig>'}")


__all__ = ["MegasleepConfig"]
