"""`megasleep demo --quick`: the whole `make demo` pipeline (shards -> train N=1 and N=2 -> evaluate at
N=1,2,4 -> table, plot, summary) at smoke size, on one CPU rank. The full demo is measured by hand
(its time and table are in docs/training.md)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.train.helpers import PY, ROOT, env


@pytest.mark.slow  # subprocess training / DeepSpeed: out of the `-m 'not slow'` inner loop
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    p = subprocess.run([PY, "-m", "megasleep.cli", "demo", "--quick", "--ranks", "1", "--steps", "4", "--out", str(out)],
                       cwd=ROOT, env=env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["passes"] for r in summary["runs"]] == [1, 2]
    for r in summary["runs"]:
        assert r["steps"] == 4 and [res["passes"] for res in r["eval"]] == [1, 2, 4]
        for res in r["eval"]:  # the results schema of `megasleep eval`
            assert 0.0 <= res["overall"]["accuracy"] <= 1.0 and [b["difficulty"] for b in res["buckets"]] == [0, 1, 2, 3]
    assert len({r["tokens_seen"] for r in summary["runs"]}) == 1  # equal steps, equal tokens for every N
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| trained N=1 | all |" in p.stdout and "| trained N=2 | all |" in p.stdout
    assert (out / "train-N2" / "export" / "model.safetensors").is_file()
    # the shards are reused by a second demo with the same settings (and rebuilt otherwise)
    from megasleep.demo import build_shards

    stamp = (out / "data" / "demo-data.json").read_text()
    before = (out / "data" / "train" / "manifest.json").stat().st_mtime_ns
    assert build_shards(out, 2_000, 96) == out / "data"
    assert (out / "data" / "train" / "manifest.json").stat().st_mtime_ns == before
    assert (out / "data" / "demo-data.json").read_text() == stamp


def test_demo_shards_of_an_older_format_are_rebuilt(tmp_path):
    """A demo directory from before the block format (its stamp has no format version) gets fresh
    shards in the current format instead of silently reusing the slower old ones."""
    from megasleep.data.manifest import FORMAT_VERSION
    from megasleep.demo import build_shards

    data = build_shards(tmp_path, 200, 16)
    stamp = data / "demo-data.json"
    manifest = data / "train" / "manifest.json"
    assert json.loads(manifest.read_text())["format_version"] == FORMAT_VERSION
    before = manifest.stat().st_mtime_ns
    build_shards(tmp_path, 200, 16)  # same settings, same format: reused
    assert manifest.stat().st_mtime_ns == before
    old = json.loads(stamp.read_text())
    del old["format_version"]
    stamp.write_text(json.dumps(old))
    build_shards(tmp_path, 200, 16)
    assert manifest.stat().st_mtime_ns != before
    assert json.loads(stamp.read_text())["format_version"] == FORMAT_VERSION
