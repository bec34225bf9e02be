"""`megasleep study`: the run plan (same data for every N of a seed), config errors, the interval maths,
the computed verdict, and one small study end to end through the real trainer (with reuse of finished
runs on a second invocation)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from megasleep.config import ConfigError
from megasleep.study.config import StudyConfig, edit, load_base, load_study, plan
from megasleep.study.report import compare, counts, load_reference, results_of, verdict, wilson, write_report
from megasleep.train.config import ExperimentConfig, dump_yaml, load_experiment
from tests.train.helpers import PY, ROOT, env

BASE = dict(name="t", experiment="configs/experiments/tiny-demo.yaml", train_passes=[1, 2], seeds=[0, 1],
            eval_passes=[1, 2], chance=0.5)


def test_wilson_matches_reference_values():
    # reference values: statsmodels proportion_confint(method="wilson")
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.236593, abs=1e-5) and hi == pytest.approx(0.763407, abs=1e-5)
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-5)
    lo, hi = wilson(90, 100)
    assert lo == pytest.approx(0.825625, abs=1e-5) and hi == pytest.approx(0.944776, abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)


def test_plan_gives_every_n_of_a_seed_the_same_data_and_differs_only_in_depth():
    cfg = StudyConfig(**BASE, random_passes=(1, 4), overrides=["train.steps=5", "optim.warmup_steps=1"])
    runs = plan(cfg)
    assert [r.dirname for r in runs] == ["N1-seed0", "N2-seed0", "N1-seed1", "N2-seed1", "Nrand-seed0"]
    assert all(isinstance(r.config, ExperimentConfig) for r in runs)
    for seed in (0, 1):
        same = [r.config.resolved() for r in runs if r.seed == seed and not r.random_n]
        assert [c["sleep"].pop("passes") for c in same] == [1, 2]
        assert all(c == same[0] for c in same), "runs of one seed must differ only in sleep.passes"
        assert same[0]["data"]["task"]["seed"] == seed and same[0]["train"]["seed"] == seed
    assert runs[0].config.train.steps == 5 and runs[0].config.optim.warmup_steps == 1  # the shared overrides
    assert runs[0].config.eval.eval_passes == [1, 2] and runs[0].config.eval.samples == cfg.eval_samples
    rand = runs[-1]
    assert rand.label == "N~U[1,4]" and rand.config.sleep.random_passes == (1, 4) and rand.config.sleep.passes == 4
    assert rand.edits["sleep"] == {"passes": 4, "random_passes": (1, 4), "random_seed": 0}
    assert runs[2].config.data.task.seed == 1 and runs[2].config.train.seed == 1


def test_typed_edits_are_validated_and_leave_the_base_untouched():
    base = load_base(StudyConfig(**BASE))
    edited = edit(base, {"sleep": {"passes": 3}, "data": {"task": {"seed": 7}}})
    assert (edited.sleep.passes, edited.data.task.seed) == (3, 7)
    assert (base.sleep.passes, base.data.task.seed) != (3, 7) and edited.data.task.name == base.data.task.name
    with pytest.raises(ConfigError, match="SleepConfig has no field 'pases'"):
        edit(base, {"sleep": {"pases": 3}})
    cfg = StudyConfig(**{**BASE, "overrides": ["train.steps=3", "optim.warmup_steps=1"]})
    bad = [r.config for r in plan(cfg, "s.yaml", base=edit(base, {"eval": {"samples": 0}}))]
    assert all(c.eval.samples == cfg.eval_samples for c in bad)  # the study's own value wins
    with pytest.raises(ConfigError, match=r"s\.yaml: run N1-seed0: sleep: random_passes=\[3, 1\]"):
        plan(cfg, "s.yaml", base=edit(base, {"sleep": {"random_passes": (3, 1)}}))


def test_a_run_config_written_as_yaml_loads_back_equal(tmp_path):
    """What a study writes to run_dir/config.yaml and trains from is the config it planned."""
    cfg = StudyConfig(**BASE, random_passes=(1, 4), overrides=["train.steps=5", "optim.warmup_steps=1"])
    for run in plan(cfg):
        path = tmp_path / f"{run.dirname}.yaml"
        path.write_text(dump_yaml(run.config))
        loaded = load_experiment(path)
        assert loaded.model_dump() == run.config.model_dump() and loaded.sleep.random_passes == run.config.sleep.random_passes


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_experiments_round_trip_through_yaml(tmp_path, path: Path):
    cfg = load_experiment(path)
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    assert load_experiment(tmp_path / "c.yaml").model_dump() == cfg.model_dump()


def test_bad_study_configs_name_the_file_and_the_problem(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: s\nexperiment: configs/experiments/tiny-demo.yaml\ntrain_passes: [1, 1]\nseeds: [0]\n"
                   "eval_passes: [1]\nchance: 0.5\n")
    with pytest.raises(ConfigError, match=r"s\.yaml.*train_passes.*distinct"):
        load_study(bad)
    bad.write_text("name: s\nexperiment: configs/experiments/tiny-demo.yaml\npasses: [1]\nseeds: [0]\n"
                   "eval_passes: [1]\nchance: 0.5\n")  # the old name of the list
    with pytest.raises(ConfigError, match=r"s\.yaml.*passes: renamed train_passes"):
        load_study(bad)
    bad.write_text("name: s\nexperiment: configs/experiments/tiny-demo.yaml\ntrain_passes: [1]\nseeds: [0]\n"
                   "eval_passes: [1]\nchance: 0.5\noverrides: [sleep.pases=2]\n")
    cfg = load_study(bad)
    with pytest.raises(ConfigError, match=r"s\.yaml: .*tiny-demo\.yaml.*sleep\.pases: unknown key"):
        plan(cfg, str(bad))
    bad.write_text("name: s\nexperiment: configs/experiments/nope.yaml\ntrain_passes: [1]\nseeds: [0]\n"
                   "eval_passes: [1]\nchance: 0.5\n")
    cfg = load_study(bad)
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        plan(cfg, str(bad))


def _fake(label, passes, seed, acc_by_d, n_per_d=200, legacy=False):
    """A finished run whose evaluation (at its own N) has the given accuracy per difficulty: in the
    harness schema (a results list), or in the pre-schema ``{"N=k": {"by_difficulty": ...}}`` form."""
    n = passes or 4
    if legacy:
        buckets = {d: {"accuracy": a, "samples": n_per_d, "loss": 0.5} for d, a in acc_by_d.items()}
        ev = {f"N={n}": {"by_difficulty": buckets}}
    else:
        buckets = [{"difficulty": int(d), "correct": round(a * n_per_d), "n_units": n_per_d, "n_samples": n_per_d,
                    "accuracy": round(a * n_per_d) / n_per_d} for d, a in acc_by_d.items()]
        c, t = sum(b["correct"] for b in buckets), sum(b["n_units"] for b in buckets)
        ev = [{"passes": n, "loss": 0.5, "buckets": buckets,
               "overall": {"correct": c, "n_units": t, "n_samples": t, "accuracy": c / t}}]
    return {"label": label, "passes": passes, "seed": seed, "name": f"N{passes}-seed{seed}", "seconds": 60.0,
            "steps": 10, "tokens_seen": 1000, "tokens_per_s": 100.0, "final_loss": 0.5,
            "eval": ev, "curve": [(1, 0.7), (10, 0.5)]}


def test_verdict_is_decided_by_the_intervals(tmp_path):
    results = [_fake("N=1", 1, 0, {"3": 0.50, "6": 0.50}), _fake("N=1", 1, 1, {"3": 0.52, "6": 0.48}),
               _fake("N=2", 2, 0, {"3": 0.80, "6": 0.70}), _fake("N=2", 2, 1, {"3": 0.78, "6": 0.72}),
               _fake("N=3", 3, 0, {"3": 0.53, "6": 0.51}), _fake("N=3", 3, 1, {"3": 0.50, "6": 0.50})]
    assert counts(results_of(results[0])[1]) == (200, 400)
    assert counts(results_of(_fake("N=1", 1, 0, {"3": 0.50, "6": 0.50}, legacy=True))[1]) == (200, 400)
    lines = verdict(results, 0.5)
    assert "N=2 at N=2" in lines[1] and "above N=1 beyond the intervals" in lines[1] and "2 of 2 seed" in lines[1]
    assert "not separable" in lines[2] and "not above chance" in lines[2]
    cfg = StudyConfig(**{**BASE, "train_passes": [1, 2, 3]})
    md = write_report(cfg, results, tmp_path, command="megasleep study x", hardware="test", wall_seconds=1.0)
    text = md.read_text()
    assert "| N=2 | N=2 | 0.750 [0.71, 0.79] | 0.750 [0.71, 0.79] | 0.750 [0.72, 0.78] |" in text
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "summary.json").read_text())["runs"][0]["label"] == "N=1"


def test_compare_checks_a_rerun_against_the_reference_intervals(tmp_path):
    ref = [_fake("N=1", 1, 0, {"6": 0.50}, n_per_d=400), _fake("N=2", 2, 0, {"6": 0.70}, n_per_d=400),
           _fake("N=3", 3, 0, {"6": 0.60}, n_per_d=400)]
    same = _fake("N=1", 1, 0, {"6": 0.50}, n_per_d=400)
    near = _fake("N=2", 2, 0, {"6": 0.72}, n_per_d=400)     # reference interval [0.653, 0.743]
    table, ok = compare(ref, [same, near])
    assert ok and "| N1-seed0 | N=1 |" in table and "identical" in table and "within the interval" in table
    assert "| N3-seed0 | - | in the reference | (not rerun) |" in table and "2 of 2 (run, N) cells" in table
    # the committed summaries of earlier studies (pre-schema) still serve as references
    legacy_ref = [_fake("N=1", 1, 0, {"6": 0.50}, n_per_d=400, legacy=True)]
    table, ok = compare(legacy_ref, [same])
    assert ok and "identical" in table
    depo_like = _fake("N=1", 1, 0, {"6": 0.50}, n_per_d=400)
    depo_like["eval"][0]["overall"]["n_samples"] = 40  # 10 scored queries per sample: not what a legacy table counted
    table, ok = compare(legacy_ref, [depo_like])
    assert not ok and "not comparable" in table
    far = _fake("N=2", 2, 0, {"6": 0.76}, n_per_d=400)
    table, ok = compare(ref, [same, far])
    assert not ok and "**no**" in table and "1 of 2" in table
    # a rerun that shares no run with the reference proves nothing
    table, ok = compare(ref, [_fake("N=4", 4, 0, {"6": 0.5})])
    assert not ok and "new run" in table and "nothing to compare" in table
    with pytest.raises(FileNotFoundError, match="missing.json: no such file"):
        load_reference(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"study": {}}')
    with pytest.raises(ValueError, match="bad.json: not a study summary.json"):
        load_reference(tmp_path / "bad.json")


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_small_study_end_to_end_and_reuse_of_finished_runs(tmp_path):
    study = tmp_path / "mini.yaml"
    study.write_text(
        "name: mini\nexperiment: configs/experiments/tiny-demo.yaml\n"
        "overrides: [train.steps=3, optim.warmup_steps=1, train.global_batch_size=4, train.micro_batch_size=4,\n"
        "  train.log_every=1,\n"
        "  logging.tensorboard=false, logging.progress=false, checkpoint.export=false, eval.batch_size=8,\n"
        "  data.task.difficulty=0-1]\n"
        f"train_passes: [1, 2]\nseeds: [0]\neval_passes: [1, 2]\neval_samples: 8\nchance: 0.5\n"
        f"out: {tmp_path / 'runs'}\nresults: {tmp_path / 'results'}\n")
    cmd = [PY, "-m", "megasleep.cli", "study", str(study), "--jobs", "2"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    results = json.loads((tmp_path / "results" / "summary.json").read_text())["runs"]
    assert [(r["name"], r["steps"]) for r in results] == [("N1-seed0", 3), ("N2-seed0", 3)]
    for run in plan(load_study(study)):  # each run trained from its planned config, written as YAML
        trained = load_experiment(tmp_path / "runs" / run.dirname / "config.yaml")
        assert trained.model_dump() == edit(run.config, {"run_dir": str(tmp_path / "runs" / run.dirname),
                                                         "checkpoint": {"resume": "never"}}).model_dump()
    for r in results:
        assert set(results_of(r)) == {1, 2} and counts(results_of(r)[1])[1] == 8
        assert r["tokens_seen"] == 3 * 4 * 26  # 3 steps of 4 sequences of 24 bits + query + label
    text = (tmp_path / "results" / "results.md").read_text()
    assert "| N=2 | N=2 |" in text and "## Verdict" in text
    ref = tmp_path / "ref.json"
    ref.write_text((tmp_path / "results" / "summary.json").read_text())
    # a second invocation reuses both finished runs; changing a setting retrains
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.count("reusing the finished run") == 2, p.stdout[-2000:]
    p = subprocess.run([*cmd, "--report-only", "--only", "N2-seed0"], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "N2-seed0" in p.stdout and "| N=1 |" not in p.stdout.split("## Cost")[0]
    p = subprocess.run([*cmd, "--only", "N7-seed0"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "N7-seed0: no such run" in p.stderr
    # a rerun checked against its own table reproduces it; against a doctored one it fails with exit 1
    p = subprocess.run([*cmd, "--report-only", "--compare", str(ref)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "4 of 4 (run, N) cells reproduced" in p.stdout, p.stdout[-2000:] + p.stderr
    assert "identical" in (tmp_path / "results" / "reproduction.md").read_text()
    doctored = json.loads(ref.read_text())
    for res in doctored["runs"][0]["eval"]:
        for b in [res["overall"], *res["buckets"]]:
            b["correct"] = b["n_units"] if b["accuracy"] < 0.5 else 0
    ref.write_text(json.dumps(doctored))
    p = subprocess.run([*cmd, "--report-only", "--compare", str(ref)], cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1 and "outside the reference interval" in p.stdout, p.stdout[-2000:] + p.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_studies_load(path: Path):
    cfg = load_study(path)
    plan(cfg, str(path))
    assert 1 in cfg.train_passes  # every study compares against the awake-only baseline
    if cfg.name.startswith("rule110"):
        assert len(cfg.seeds) >= 2 and {1, 2, 3, 4} <= set(cfg.train_passes)  # the floor for a Rule 110 depth study


def test_a_run_is_trained_by_one_invocation_at_a_time(tmp_path):
    import subprocess as sp
    import threading
    import time

    from megasleep.study.run import _claim

    lock = tmp_path / ".N1-seed0.lock"
    dead = sp.Popen(["true"])
    dead.wait()
    lock.write_text(str(dead.pid))  # left behind by a process that died: taken over at once
    with _claim(lock, "N1-seed0", poll=0.05):
        assert lock.read_text() == str(__import__("os").getpid())
    assert not lock.exists()
    owner = sp.Popen(["sleep", "30"])
    try:
        lock.write_text(str(owner.pid))  # held by a live process: wait until it lets go
        threading.Timer(0.5, lock.unlink).start()
        t0 = time.time()
        with _claim(lock, "N1-seed0", poll=0.05):
            assert time.time() - t0 >= 0.45
    finally:
        owner.kill()


def test_verdict_does_not_count_a_collapsed_run():
    """A run whose sleep passes collapsed (diagnostics carried by its training evaluation) is left out of
    its group's pooled accuracy and named; a group of only collapsed runs gets no verdict."""
    ok = {"diag/passes": 2.0, "diag/pass1/G1/key_share": 0.3, "diag/pass2/G1/key_share": 0.4}
    collapsed = {"diag/passes": 2.0, "diag/pass1/G1/key_share": 0.3, "diag/pass2/G1/key_share": 0.97}
    results = [_fake("N=1", 1, 0, {"3": 0.50}), _fake("N=1", 1, 1, {"3": 0.50}),
               _fake("N=2", 2, 0, {"3": 0.90}), _fake("N=2", 2, 1, {"3": 0.50})]
    results[2]["eval"][0]["diagnostics"] = collapsed   # the "good" seed collapsed: not evidence
    results[3]["eval"][0]["diagnostics"] = ok
    lines = verdict(results, 0.5)
    assert lines[1].startswith("N=2 at N=2: 0.500") and "not separable" in lines[1]
    assert "0 of 1 seed(s)" in lines[1] and "not counted as evidence about sleep: N2-seed0" in lines[1]
    assert "collapsed" not in lines[0]
    results[3]["eval"][0]["diagnostics"] = collapsed
    lines = verdict(results, 0.5)
    assert lines[1] == ("N=2: every run collapsed, no verdict (collapsed run(s) not counted as evidence about "
                        "sleep: N2-seed0, N2-seed1).")
    # diagnostics measured after training (study option `diagnostics`) decide the same way
    results[2]["eval"][0].pop("diagnostics")
    results[2]["diagnostics"] = {"N=2": ok}
    assert "not counted as evidence about sleep: N2-seed1" in verdict(results, 0.5)[1]
