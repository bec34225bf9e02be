"""Which adapter reads a foreign ``config.json``; an unknown family names the nearest supported one."""

from __future__ import annotations

import difflib

from megasleep.checkpoint.adapters.base import Adapter
from megasleep.checkpoint.adapters.hf_attention import HFAttentionAdapter
from megasleep.checkpoint.adapters.hf_hybrid import HFHybridAdapter
from megasleep.checkpoint.adapters.hf_mamba2 import HFMamba2Adapter
from megasleep.checkpoint.adapters.mamba_ssm import MambaSSMAdapter
from megasleep.checkpoint.adapters.nemotron_h import NemotronHAdapter
from megasleep.checkpoint.adapters.olmo_hybrid import OlmoHybridAdapter
from megasleep.checkpoint.errors import PretrainedError, UnsupportedModelError

ADAPTERS: tuple[type[Adapter], ...] = (MambaSSMAdapter, HFAttentionAdapter, HFMamba2Adapter, HFHybridAdapter,
                                       NemotronHAdapter, OlmoHybridAdapter)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS for t in a.model_types})


def adapter_for(raw: dict, where: str) -> Adapter:
    for cls in ADAPTERS:
        if cls.matches(raw):
            return cls()
    mt = raw.get("model_type")
    known = supported_model_types()
    if mt is None:
        raise PretrainedError(f"{where}: no model_type and not a megasleep or mamba_ssm config "
                              f"(keys: {sorted(raw)[:20]}); supported model_types: {known}")
    near = difflib.get_close_matches(str(mt), known, n=1, cutoff=0.0)
    raise UnsupportedModelError(f"{where}: model_type {mt!r} is not supported (nearest supported: "
                                f"{near[0] if near else None!r}; all: {known})")


__all__ = ["ADAPTERS", "adapter_for", "supported_model_types"]
