"""megasleep: hybrid SSM-attention language models that sleep (see docs/sleep.md and the paper, arXiv 2605.26099)."""

__version__ = "0.1.0"
