"""Diagnostics of finished runs (megasleep.study.diagnose) on run directories laid out as the trainer
leaves them, built here without training: config.yaml + export/ of a fresh pointer model."""

from __future__ import annotations

import json

import pytest

from megasleep.study.diagnose import DIAG_FILE, diagnose_run, diagnostics_section, main, status_rows

POINTER = ["model=configs/models/tiny-ag.yaml", "sleep.window=36", "data.task.name=pointer",
           "data.task.params={n_min: 8, n_max: 12, graph_len: 36}", "data.task.difficulty=[1,2]"]


def fake_run(tmp_path, name: str, passes: int):
    from megasleep.checkpoint.released import save_pretrained
    from megasleep.data.tasks import get_task
    from megasleep.models import HybridLM
    from megasleep.train.config import dump_yaml, load_experiment

    run = tmp_path / name
    run.mkdir()
    cfg = load_experiment(None, [*POINTER, f"sleep.passes={passes}", f"run_dir={run}"])
    (run / "config.yaml").write_text(dump_yaml(cfg))
    tok = get_task("pointer").make_task_tokenizer(run / "tokenizer")
    save_pretrained(HybridLM(cfg.model_cfg), run / "export", tokenizer_path=tok.path)
    return run


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_diagnose_run_writes_json_and_labels(tmp_path, capsys):
    n1, n2 = fake_run(tmp_path, "N1-seed0", 1), fake_run(tmp_path, "N2-seed0", 2)
    diags = diagnose_run(n2, [1, 2], samples=16)
    saved = json.loads((n2 / DIAG_FILE).read_text())
    assert saved["eval_passes"] == [1, 2] and saved["samples"] == 16 and saved["diagnostics"] == diags
    assert set(diags) == {"N=1", "N=2"} and "diag/pass2/G1/key_share" in diags["N=2"]
    assert "diag/pass2/rms" not in diags["N=1"]
    rows = status_rows({"N2-seed0": (2, diags), "N1-seed0": (1, diagnose_run(n1, [1], samples=16))})
    assert rows["N1-seed0"][1] == "awake" and rows["N2-seed0"][1] in ("ok", "collapsed", "shared keys")
    assert rows["N2-seed0"][0] is diags["N=2"]
    section = "\n".join(diagnostics_section([{"name": "N2-seed0", "passes": 2, "diagnostics": diags},
                                             {"name": "N1-seed0", "passes": 1}]))
    assert "| N2-seed0 | 2 |" in section and "N1-seed0" not in section
    assert main([str(n1), "--eval-passes", "1", "--samples", "8"]) == 0
    assert "| N1-seed0 | 1 |" in capsys.readouterr().out


def test_collapsed_run_is_named_in_the_report():
    shares = {"diag/passes": 2.0, "diag/pass1/G1/key_share": 0.4, "diag/pass2/G1/key_share": 0.97}
    awake = {"diag/passes": 1.0, "diag/pass1/G1/key_share": 0.3}
    lines = diagnostics_section([{"name": "N2-seed0", "passes": 2, "diagnostics": {"N=2": shares}},
                                 {"name": "N1-seed0", "passes": 1, "diagnostics": {"N=1": awake}}])
    assert "- **Collapsed runs, not evidence about sleep:** N2-seed0" in lines


def test_run_without_export_is_a_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(FileNotFoundError, match="export/config.json"):
        diagnose_run(tmp_path, [1])
    assert main([str(tmp_path)]) == 2
