"""megasleep: hybrid SSM-attention language models that sleep (see docs/ and ../shared/SPEC.md)."""

__version__ = "0.1.0"
