"""megasleep: hybrid SSM-attention language models that sleep (see docs/sleep.md and the paper, arXiv 2605.26099)."""

__version__ = "0.1.0"

from megasleep.checkpoint.autoregister import install as _install_transformers_hook  # noqa: E402

_install_transformers_hook()  # AutoModelForCausalLM can load megasleep exports (stdlib only: no cost)
