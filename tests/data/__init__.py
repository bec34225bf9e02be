"""Tests of megasleep.data (tokenizers, task generators, shards, loader)."""
