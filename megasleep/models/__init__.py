"""Model definitions: config, mixers (attn, mamba2, gdn), blocks and the HybridLM."""

from megasleep.models.cache import LayerCache, MixContext, doc_resets
from megasleep.models.config import ModelConfig, load_model_config
from megasleep.models.hybrid import HybridLM, build_model

__all__ = ["HybridLM", "LayerCache", "MixContext", "ModelConfig", "build_model", "doc_resets",
           "load_model_config"]
