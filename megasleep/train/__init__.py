"""Training: the DeepSpeed Trainer (trainer.py), experiment configs (config.py), checkpoints
(checkpoint.py), optimizers and schedules (optim.py), metrics (metrics.py), in-training evaluation
(evaluate.py), export (export.py), the `megasleep train` command (cli.py). See docs/training.md.

Importing this package is cheap; deepspeed is imported when a Trainer is built.
"""
