"""Checkpoint formats: weights I/O (weights.py), the released format (released.py), loading any supported
directory (load.py), DeepSpeed consolidation (deepspeed.py), one adapter per foreign family (adapters/),
transformers interop (hf.py) and retrofitting (retrofit.py). See docs/checkpoint.md and docs/released.md."""
