"""Export a HybridLM to a foreign family's directory (config.json + safetensors) through its adapter, so
the family's own code (e.g. transformers' LlamaForCausalLM) loads it. Written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from megasleep.checkpoint.adapters.registry import ADAPTERS
from megasleep.checkpoint.errors import UnsupportedModelError
from megasleep.checkpoint.weights import CONFIG_NAME, replace_dir, save_weights, temp_dir_for


def export_foreign(model, out_dir: str | os.PathLike, family: str | None = None,
                   max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` for the first exporting adapter that accepts it (or the one named ``family``)."""
    out = Path(out_dir)
    cands = [a for a in ADAPTERS if a.can_export and (family is None or family in (a.name, *a.model_types))]
    if not cands:
        raise UnsupportedModelError(f"no adapter exports to {family!r} "
                                    f"(exporting: {[a.name for a in ADAPTERS if a.can_export]})")
    state = {k: v for k, v in model.state_dict().items()}
    errors = []
    for cls in cands:
        try:
            raw, tensors = cls().export(model.config, state, str(out))
            break
        except UnsupportedModelError as exc:
            errors.append(str(exc))
    else:
        raise UnsupportedModelError("; ".join(errors))
    tmp = temp_dir_for(out)
    try:
        save_weights(tensors, tmp, max_shard_size=max_shard_size)
        (tmp / CONFIG_NAME).write_text(json.dumps({**raw, "dtype": "float32"}, indent=1, sort_keys=True) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


__all__ = ["export_foreign"]
