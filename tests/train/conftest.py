"""Fixtures of the trainer tests. The uninterrupted reference run is shared (session scope): the
golden-loss, SIGTERM-resume and SIGKILL-during-save tests all compare against it."""

from __future__ import annotations

import pytest

from tests.train.helpers import FAST, losses, run_train


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_train(*FAST, f"run_dir={run_dir}")
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 11)), got
    return run_dir, got
