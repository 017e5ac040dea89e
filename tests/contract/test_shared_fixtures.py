"""The guard on the run's shared artifacts (tests/factories/once.py): a test that writes into a
bundle every test reads makes the suite's outcome depend on test order, which parallel runs
change; the fixtures' teardown catches it."""

from __future__ import annotations

import os

import pytest

from factories.once import listing, unchanged, worker_cpus


def test_a_write_into_a_shared_artifact_is_caught(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    before = listing(tmp_path)
    unchanged(tmp_path, before)                       # nothing written: quiet
    (tmp_path / "evaluations.json").write_text("[]")  # what `eval` adds beside a manifest
    with pytest.raises(AssertionError, match="evaluations.json"):
        unchanged(tmp_path, before)
    before = listing(tmp_path)
    st = (tmp_path / "manifest.json").stat()
    os.utime(tmp_path / "manifest.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="copy it before writing"):
        unchanged(tmp_path, before)                   # rewritten in place


def test_xdist_workers_split_the_cpus():
    env = {"PYTEST_XDIST_WORKER_COUNT": "2"}
    assert worker_cpus({**env, "PYTEST_XDIST_WORKER": "gw0"}, [0, 1]) == [0]
    assert worker_cpus({**env, "PYTEST_XDIST_WORKER": "gw1"}, [0, 1]) == [1]
    assert worker_cpus({"PYTEST_XDIST_WORKER_COUNT": "3", "PYTEST_XDIST_WORKER": "gw0"},
                       [0, 1, 2, 3]) == [0, 3]
    assert worker_cpus({**env, "PYTEST_XDIST_WORKER": "gw1"}, [1]) is None   # a floors sub-run
    assert worker_cpus({}, [0, 1]) is None                                     # not under xdist
