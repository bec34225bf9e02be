"""`megasleep generate` and `megasleep export --from-released` take a foreign checkpoint directory (here a
tiny random transformers Llama) and say which adapter read it; generate's tokens are the streaming
engine's on the imported model."""

from __future__ import annotations

import torch

from megasleep.checkpoint.load import load_pretrained
from megasleep.cli import main
from megasleep.inference.generate import generate
from tests.checkpoint.hf_models import build_hf

LLAMA = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=64)


def test_generate_reads_a_transformers_llama(tmp_path, capsys):
    build_hf("llama", tmp_path / "hf", **LLAMA)
    rc = main(["generate", "--checkpoint", str(tmp_path / "hf"), "--prompt-ids", "1,2,3,4", "--window", "4",
               "-N", "2", "--max-new-tokens", "6", "--temperature", "0", "--no-eos"])
    out = capsys.readouterr()
    assert rc == 0
    assert "read with the transformers-llama adapter" in out.err
    model = load_pretrained(tmp_path / "hf")
    want = generate(model, [[1, 2, 3, 4]], 6, window=4, passes=2, temperature=0.0).tokens[0]
    assert " ".join(map(str, want)) in out.out.replace(",", " ")


def test_export_converts_a_transformers_hybrid(tmp_path, capsys):
    build_hf("mamba2", tmp_path / "hf", hidden_size=32, num_hidden_layers=2, vocab_size=64, num_heads=8,
             head_dim=8, state_size=8, n_groups=1, expand=2, chunk_size=8)
    assert main(["export", "--from-released", str(tmp_path / "hf"), "--out", str(tmp_path / "ms")]) == 0
    assert "converted transformers-mamba2 checkpoint" in capsys.readouterr().out
    a, b = load_pretrained(tmp_path / "hf"), load_pretrained(tmp_path / "ms")
    assert b.pretrained_meta["format"] == "megasleep" and b.pretrained_meta["source"]["kind"] == "transformers-mamba2"
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
