"""Register megasleep's model type with transformers' auto classes without importing transformers.

``import megasleep`` installs a post-import hook: when ``transformers.models.auto.configuration_auto``
(``modeling_auto``) finishes importing, ``MegasleepConfig`` (``MegasleepForCausalLM``) is registered, so
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(export_dir)`` work, while a process that never
touches transformers pays nothing (importing it costs seconds). Stdlib only, on purpose.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

_CONFIG_MODULE = "transformers.models.auto.configuration_auto"
_MODEL_MODULE = "transformers.models.auto.modeling_auto"


def _register_config() -> None:
    from transformers import AutoConfig

    from megasleep.checkpoint.hf_config import MegasleepConfig

    AutoConfig.register("megasleep", MegasleepConfig, exist_ok=True)


def _register_model() -> None:
    from transformers import AutoModelForCausalLM

    from megasleep.checkpoint.hf import MegasleepForCausalLM
    from megasleep.checkpoint.hf_config import MegasleepConfig

    _register_config()
    AutoModelForCausalLM.register(MegasleepConfig, MegasleepForCausalLM, exist_ok=True)


_HOOKS = {_CONFIG_MODULE: _register_config, _MODEL_MODULE: _register_model}


def _run(name: str) -> None:
    try:
        _HOOKS[name]()
    except Exception as exc:  # never break the user's transformers import
        warnings.warn(f"megasleep: could not register with transformers ({type(exc).__name__}: {exc})",
                      stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _HOOKS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                exec_module = spec.loader.exec_module

                def run_then_register(module, _exec=exec_module, _name=name):
                    _exec(module)
                    _run(_name)

                spec.loader.exec_module = run_then_register
                return spec
        return None


def install() -> None:
    """Idempotent: hook future imports, and register now for what transformers already imported."""
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name in _HOOKS:
        if name in sys.modules:
            _run(name)


__all__ = ["install"]
