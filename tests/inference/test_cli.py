"""`megasleep generate` end to end on a checkpoint directory written here (config.json + safetensors
(+ tokenizer.model)), through the real `megasleep` entry point."""

from __future__ import annotations

import json
import random

import pytest
import torch

from megasleep import __version__
from megasleep.cli import main as megasleep_main
from megasleep.inference import generate
from megasleep.sleep import SleepConfig
from tests.conftest import tiny_model

WORDS = ["sleep", "wake", "window", "memory", "state", "token", "fast", "weight", "model", "the", "a", "of"]


def make_tokenizer(path, vocab):
    from megasleep.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    return train_tokenizer(path, texts=texts, vocab_size=vocab, byte_fallback=False, hard_vocab_limit=False)


def write_checkpoint(model, path, tokenizer_file=None, sleep=None):
    path.mkdir(parents=True, exist_ok=True)
    try:
        from megasleep.checkpoint.released import save_pretrained
    except ModuleNotFoundError:
        from safetensors.torch import save_model

        (path / "config.json").write_text(json.dumps({**model.config.model_dump(), "megasleep_version": __version__,
                                                      **({"sleep": sleep} if sleep else {})}))
        save_model(model, str(path / "model.safetensors"))
        if tokenizer_file is not None:
            (path / "tokenizer.model").write_bytes(open(tokenizer_file, "rb").read())
    else:
        save_pretrained(model, path, tokenizer_path=tokenizer_file, sleep=sleep)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = make_tokenizer(root / "tok", 64)
    model = tiny_model("MAGMA", n_prelude=1, n_coda=1, vocab=tok.vocab_size, dtype=torch.float32)
    return model, tok, write_checkpoint(model, root / "ckpt", tok.path)


def run(capsys, *args):
    rc = megasleep_main(["generate", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_with_prompt_ids_matches_the_api(ckpt, capsys):
    model, _, path = ckpt
    rc, out, err = run(capsys, "--checkpoint", path, "--prompt-ids", "4,5,6,7,8,9,10", "--passes", 3,
                       "--window", 4, "--eviction", "sliding", "--max-new-tokens", 9, "--temperature", 0,
                       "--no-eos", "--device", "cpu")
    assert rc == 0, err
    with torch.no_grad():
        expect = generate(model, [[4, 5, 6, 7, 8, 9, 10]], 9, window=4, passes=3, eviction="sliding",
                          temperature=0).tokens[0]
    # a tokenizer.model sits in the checkpoint, so the continuation is printed as text
    from megasleep.data.tokenizer import load_tokenizer

    assert out.strip() == load_tokenizer(path / "tokenizer.model").decode(expect).strip()
    assert "sleeps: 3" in err                     # 7 + 8 tokens fed: windows 1-3 filled
    assert "3 passes x3" in err and "awake:" in err and "tokens/s" in err and "peak RSS" in err


def test_generate_text_prompt_streams_text(ckpt, capsys):
    _, tok, path = ckpt
    rc, out, err = run(capsys, "--checkpoint", path, "--prompt", "the fast model of the window", "-N", 2, "-L", 5,
                       "--max-new-tokens", 6, "--seed", 3, "--top-k", 5, "--top-p", 0.9)
    assert rc == 0, err
    assert "N=2 L=5 eviction=hard" in err and "generated" in err
    assert len(out.strip()) > 0


def test_vocab_mismatch_is_a_clear_error(ckpt, capsys, tmp_path):
    _, _, path = ckpt
    big = make_tokenizer(tmp_path / "big", 80)
    assert big.vocab_size != 64
    rc, out, err = run(capsys, "--checkpoint", path, "--tokenizer", big.path, "--prompt", "the model", "-L", 4)
    assert rc == 2
    assert "vocabulary mismatch" in err and "vocab_size=64" in err and f"{big.vocab_size} pieces" in err


@pytest.mark.parametrize("args,msg", [
    (["--prompt-ids", "", "-L", 4], "empty prompt"),
    (["--prompt-ids", "1,2,64", "-L", 4], "token ids must be integers in [0, 64) for this model, got [64]"),
    (["--prompt-ids", "1,x", "-L", 4], "must be integers"),
    (["--prompt-ids", "1,2", "-L", 4, "--passes", 0], "--passes must be >= 1"),
    (["--prompt-ids", "1,2"], "give --window"),
])
def test_bad_cli_input(ckpt, capsys, args, msg):
    _, _, path = ckpt
    rc, out, err = run(capsys, "--checkpoint", path, *args)
    assert rc == 2 and msg in err, err


def test_missing_checkpoint_is_a_clear_error(capsys, tmp_path):
    rc, _, err = run(capsys, "--checkpoint", tmp_path / "nope", "--prompt-ids", "1", "-L", 4)
    assert rc == 2 and "checkpoint directory not found" in err


def test_sleep_settings_default_to_the_checkpoints(ckpt, capsys, tmp_path):
    model, _, _ = ckpt
    path = write_checkpoint(model, tmp_path / "with_sleep", sleep={"window": 3, "passes": 2, "eviction": "sliding"})
    rc, out, err = run(capsys, "--checkpoint", path, "--prompt-ids", "1 2 3 4 5", "--max-new-tokens", 2,
                       "--temperature", 0)
    assert rc == 0, err
    assert "N=2 L=3 eviction=sliding" in err and "sleeps: 2" in err
    assert out.split() and all(t.isdigit() for t in out.split())     # no tokenizer: ids are printed


def test_the_old_flag_name_is_refused_with_the_new_one(ckpt, capsys):
    _, _, path = ckpt
    with pytest.raises(SystemExit) as exc:
        run(capsys, "--checkpoint", path, "--prompt-ids", "1,2", "-L", 4, "--sleep-passes", 2)
    assert exc.value.code == 2
    assert "--sleep-passes: renamed --passes" in capsys.readouterr().err


def test_generate_uses_the_sleep_remedies_the_checkpoint_records(ckpt, tmp_path, capsys, monkeypatch):
    """A checkpoint trained with reinject / feedback_norm generates with them (they change its forward;
    that a Session with them equals the chunked forward: tests/inference/test_parity.py)."""
    import importlib

    gen = importlib.import_module("megasleep.inference.generate")  # the package's `generate` is the function
    model, tok, _ = ckpt
    seen = []
    real = gen.generate_stream
    monkeypatch.setattr(gen, "generate_stream", lambda *a, **kw: seen.append(kw["sleep"]) or real(*a, **kw))
    for switches in ({"reinject": True, "feedback_norm": True}, {"reinject": True}, {}):
        path = write_checkpoint(model, tmp_path / f"r{len(seen)}", tok.path,
                                sleep={"window": 3, "passes": 3, "eviction": "hard", **switches})
        rc, out, err = run(capsys, "--checkpoint", path, "--prompt-ids", "4,5,6,7,8,9,10", "--max-new-tokens", 4,
                           "--temperature", 0, "--no-eos", "--device", "cpu")
        assert rc == 0, err
        want = SleepConfig(window=3, passes=3, checkpoint=False, **switches)
        assert seen[-1] == want and (seen[-1].reinject, seen[-1].feedback_norm) == (
            switches.get("reinject", False), switches.get("feedback_norm", False))
