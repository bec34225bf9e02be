"""Evaluation: the harness (`megasleep eval`), GSM scoring, released-checkpoint export / import
(`megasleep export`, mamba_ssm importer) and the lm-evaluation-harness adapter.

Importing this package is cheap; every submodule imports torch / matplotlib / lm_eval lazily where
it can. See docs/evaluation.md.
"""
