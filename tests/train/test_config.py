"""Experiment configs: every shipped one loads; malformed ones and missing paths fail with one clear
message naming the problem and the file / path (before any process group or model is built)."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from megasleep.config import ConfigError
from megasleep.models import ModelConfig
from megasleep.train.config import DEFAULT_EXPERIMENT, load_experiment
from tests.train.helpers import PY, ROOT, env

EXPERIMENTS = sorted((ROOT / "configs" / "experiments").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_default_and_overrides():
    cfg = load_experiment(None, ["sleep.passes=2", "model.d_model=32", "optim.name=muon", "run_dir=/tmp/x/{name}"])
    assert cfg.name == "tiny-demo" and cfg.sleep.passes == 2 and cfg.optim.name == "muon"
    assert cfg.model.d_model == 32 and cfg.model.pattern == "AGAG"  # base file + inline change
    assert isinstance(cfg.model, ModelConfig) and cfg.model_cfg is cfg.model
    assert str(cfg.run_path) == "/tmp/x/tiny-demo"
    swapped = load_experiment(DEFAULT_EXPERIMENT, ["model=configs/models/tiny-mamba.yaml"])
    assert "M" in swapped.model.pattern


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_experiments_load(path):
    from megasleep.models.info import count
    from megasleep.train.config import resolve_path

    cfg = load_experiment(path)
    assert resolve_path(cfg.deepspeed.config).is_file(), cfg.deepspeed.config
    t = cfg.train
    assert t.global_batch_size % t.micro_batch_size == 0
    assert count(cfg.model)["total"] > 0  # builds on the meta device
    assert cfg.sleep.window >= 1


GOOD = """
name: t
model: configs/models/tiny.yaml
sleep: {window: 24}
train: {steps: 2, global_batch_size: 4, micro_batch_size: 2}
"""


@pytest.mark.parametrize("extra, words", [
    ("trian: {steps: 3}\n", ["trian", "unknown key"]),
    ("optim: {name: sgd}\n", ["optim.name", "sgd"]),
    ("optim: {lr: -1}\n", ["optim.lr", "greater than 0"]),
    ("checkpoint: {keep_last: 0}\n", ["checkpoint.keep_last"]),
    ("data: {source: shards}\n", ["data", "needs data.train"]),
    ("eval: {eval_passes: []}\n", ["eval", "non-empty"]),
    ("eval: {passes: [1, 2]}\n", ["eval: passes: renamed eval_passes"]),  # the list's old name
    ("data: {task: {name: rule111}}\n", ["data.task.name", "unknown task 'rule111'", "depo, gsm, pointer, rule110"]),
    ("data: {task: {difficulty: abc}}\n", ["data.task.difficulty", "'abc' is not a difficulty"]),
    ("data: {task: {eval_difficulty: 3-1}}\n", ["data.task.eval_difficulty", "'3-1' is not a difficulty"]),
    ("data: {task: {params: {widht: 8}}}\n", ["data.task", "widht", "not parameters of task 'rule110'"]),
    ("data: {loader: {num_workerz: 0}}\n", ["data.loader.num_workerz", "unknown key"]),
    ("optim: {warmup_steps: 2}\n", ["optim.warmup_steps=2", "train.steps=2"]),
])
def test_malformed_experiment(tmp_path, extra, words):
    path = write(tmp_path, GOOD + extra)
    with pytest.raises(ConfigError) as exc:
        load_experiment(path)
    msg = str(exc.value)
    assert str(path) in msg and all(w in msg for w in words), msg


@pytest.mark.parametrize("text, words", [
    (GOOD.replace("steps: 2, ", ""), ["train.steps", "Field required"]),
    (GOOD.replace("window: 24", "window: 0"), ["sleep.window", "greater than or equal to 1"]),
    (GOOD.replace("micro_batch_size: 2", "micro_batch_size: 3"), ["global_batch_size=4", "micro_batch_size=3"]),
    (GOOD.replace("configs/models/tiny.yaml", "configs/models/nope.yaml"), ["model.base", "nope.yaml", "not found"]),
    (GOOD + "model: {base: configs/models/tiny.yaml, pattern: AXA}\n", ["pattern", "unknown block letter"]),
    ("name: [unclosed\n", ["not valid YAML"]),
])
def test_malformed_experiment_more(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_experiment(path)
    msg = str(exc.value)
    assert str(path) in msg and all(w in msg for w in words), msg


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_experiment(None, ["sleep.passes"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_experiment(tmp_path / "missing.yaml")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "megasleep.cli", "train", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)


def _cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """The same entry point as the command line (megasleep.cli.main), without a new interpreter."""
    import sys

    from megasleep.cli import main

    argv = sys.argv
    try:
        rc = main(["train", *args])
    finally:
        sys.argv = argv
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["train.stepz=3"], ["train.stepz", "unknown key"]),
    (["checkpoint.resume=/nonexistent/ckpts"], ["/nonexistent/ckpts", "no such checkpoint directory"]),
    (["data.source=shards", "data.train=/nonexistent/shards"], ["data.train", "/nonexistent/shards"]),
    (["deepspeed.config=configs/deepspeed/zero9.json"], ["deepspeed.config", "zero9.json"]),
    (["data.tokenizer=/nonexistent/tok.model"], ["data.tokenizer", "/nonexistent/tok.model"]),
])
def test_bad_input_fails_fast_with_a_clear_error(tmp_path, capsys, args, words):
    rc, err = _cli_in_process(capsys, *args, f"run_dir={tmp_path}/run")
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("megasleep train: error:") and all(w in last for w in words), err
    assert not (tmp_path / "run").exists()  # failed before touching the run directory


def test_resume_from_incomplete_checkpoint(tmp_path, capsys):
    tag = tmp_path / "ckpts" / "step_00000004"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    rc, err = _cli_in_process(capsys, f"checkpoint.resume={tag}", f"run_dir={tmp_path}/run")
    assert rc == 2 and "incomplete checkpoint" in err and str(tag) in err, err


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_command_line_exit_status_and_message(tmp_path):
    """One real process: exit status 2, one error line, no traceback; and the print modes."""
    p = _cli("checkpoint.resume=/nonexistent/ckpts", f"run_dir={tmp_path}/run")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "megasleep train: error: checkpoint.resume: /nonexistent/ckpts: no such checkpoint directory")
    p = _cli("sleep.passes=3", f"run_dir={tmp_path}/r-{{name}}", "--print-run-dir")
    assert p.returncode == 0 and p.stdout.strip() == f"{tmp_path}/r-tiny-demo"


def test_config_errors_are_one_line_and_fail_print_config(tmp_path, capsys):
    """A wrong task name fails at load (so --print-config and the launch preflight refuse it too), in
    one line listing the valid names; a bad difficulty names its key."""
    for args, words in ((["data.task.name=rule111"], ["data.task.name", "valid names: depo, gsm, pointer, rule110"]),
                        (["data.task.difficulty=abc"], ["data.task.difficulty", "'abc'"]),
                        (["train.steps=5"], ["optim.warmup_steps=20", "train.steps=5"])):
        rc, err = _cli_in_process(capsys, *args, "--print-config")
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and all(w in lines[0] for w in words), err
        assert "got {" not in lines[0]  # not the whole config dumped into the message


def test_model_is_a_typed_section_and_round_trips():
    from megasleep.train.config import experiment_from_dict

    cfg = load_experiment(None, ["model.d_model=32"])
    again = experiment_from_dict(cfg.resolved(), "saved")
    assert again.model_dump() == cfg.model_dump() and again.model.d_model == 32
    inline = load_experiment(None, ["model=configs/models/tiny-mamba.yaml", "model.n_coda=1"])
    assert inline.model.n_coda == 1 and "M" in inline.model.pattern
