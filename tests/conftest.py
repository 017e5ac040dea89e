"""Shared fixtures: a tiny random Llama folder, a bundle built from it, and the real SmolLM2
bundle (built once per session; the real model must be exercised by the suite)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from factories.once import built_once, listing, unchanged, worker_cpus

# Under pytest-xdist each worker runs on its own share of the CPUs, pinned before torch or ONNX
# Runtime size their thread pools (both follow the affinity mask): two workers of two threads
# each on two cores spent 20% more CPU time on the same suite.
_mine = worker_cpus(os.environ, sorted(os.sched_getaffinity(0)))
if _mine:
    try:
        os.sched_setaffinity(0, _mine)
    except OSError:     # a sandbox that forbids it: the workers share the CPUs, as before
        pass

from factories.bundles import exact_paper_profile, small_profile  # noqa: E402  (after pinning)
from factories.models import make_tiny_family, make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_verify_cache(tmp_path_factory):
    """Verified-file stamps and kept measurements go to a folder of this test run, not the
    user's cache (the session's fixtures are built with this one)."""
    os.environ["LSAQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("lsaq-cache"))


@pytest.fixture(autouse=True, scope="session")
def _private_tmp(tmp_path_factory):
    """The system's temporary folder, for this process and its children, is one of this test
    run's, which pytest prunes: builds a test kills outright (SIGKILL) cannot remove theirs,
    nor can a worker that ends without running finalizers, and each run left folders in /tmp."""
    import tempfile

    d = tmp_path_factory.mktemp("tmp")
    os.environ["TMPDIR"] = tempfile.tempdir = str(d)


@pytest.fixture(autouse=True)
def _cache_of_this_test(tmp_path_factory, monkeypatch):
    """Each test its own cache: a measurement kept by one test's build must not turn another
    test's measurement (a kill mid-measurement, a refusal before measuring) into a reuse."""
    monkeypatch.setenv("LSAQ_CACHE_DIR", str(tmp_path_factory.mktemp("lsaq-cache")))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama_dir, tmp_path_factory):
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    # Every INT4 count (ladder "full"); smollm_bundle keeps the fast defaults.
    prof = exact_paper_profile(samples=8, seq_len=64, ladder="full")
    build_bundle(tiny_llama_dir, out, profile=prof, progress=Progress(quiet=True))
    before = listing(out)
    yield out
    unchanged(out, before)     # shared by every test: none may write into it


@pytest.fixture(scope="session")
def smollm_bundle(pytestconfig, tmp_path_factory):
    """The real default model through the default profile (measured sensitivity, a ladder by
    bytes, quality measured per variant); calibration and rungs kept small for speed."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    if os.environ.get("LSAQ_TEST_BUNDLE"):  # reuse a bundle built by hand while developing
        yield Path(os.environ["LSAQ_TEST_BUNDLE"])
        return
    prof = small_profile(samples=2, seq_len=96)
    prof.scoring.measure = "fisher"   # the default profile's measurement, as a user builds it
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 4, 1, 4
    out = built_once(pytestconfig, tmp_path_factory, "smollm2", lambda d: build_bundle(
        None, d / "smollm2", profile=prof, progress=Progress(quiet=True)))
    before = listing(out)
    yield out
    unchanged(out, before)


def _uses_real_bundle(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {}).values()
    return "smollm_bundle" in getattr(item, "fixturenames", ()) or "smollm_bundle" in params


@pytest.fixture(autouse=True, scope="session")
def _first_worker_builds_the_real_bundle(request):
    """Under pytest-xdist the first worker builds the real SmolLM2 bundle before its first
    test, while the others start on theirs: when two workers' first tests both needed it,
    one waited idle for the whole build. (xdist's --dist loadgroup would keep these tests on
    one worker, but with pytest 9.2 it does not group them: the suffixed node id it sets is
    not the one reported.)"""
    wid = getattr(request.config, "workerinput", {}).get("workerid")
    if wid == "gw0" and any(map(_uses_real_bundle, request.session.items)):
        request.getfixturevalue("smollm_bundle")


@pytest.fixture(scope="session")
def ladder_bundles(tiny_llama_dir, pytestconfig, tmp_path_factory):
    """Schema 6 bundles with the token tables on the ladder, built once for both exporters'
    tests (read only): the untied tiny Llama with the default profile's INT4 (group 32, zero
    points), and a tied tiny Qwen3 per channel whose fp16-table rung's CPU head is the INT8
    table (cpu_lm_head int8)."""
    from factories.bundles import ladder_build

    out = built_once(pytestconfig, tmp_path_factory, "ladder", lambda tmp: {
        "untied": ladder_build(tiny_llama_dir, tmp / "untied"),
        "tied": ladder_build(make_tiny_family(tmp / "hf-qwen3", "qwen3"), tmp / "tied",
                             scheme="channel", cpu_lm_head="int8")})
    before = {k: listing(p) for k, p in out.items()}
    yield out
    for k, p in out.items():
        unchanged(p, before[k])


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist the longest tests (slow-marked, the dependency floors' sub-runs) go
    first, so the workers share them out at the start instead of one finishing a five-minute
    test alone at the end. Serial runs keep the file order."""
    if hasattr(config, "workerinput"):   # the workers collect; the controller schedules
        items.sort(key=lambda it: not (it.get_closest_marker("slow") or "floors" in it.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """LSAQ_TEST_TIMELINE=FOLDER: each worker appends "start end worker nodeid" per test to
    FOLDER/<worker>.tsv, to see where a parallel run's workers sat idle (durations alone do
    not say when a test ran)."""
    folder = os.environ.get("LSAQ_TEST_TIMELINE")
    t0 = time.time()
    yield
    if folder:
        wid = getattr(item.config, "workerinput", {}).get("workerid", "main")
        with open(Path(folder) / f"{wid}.tsv", "a") as f:
            f.write(f"{t0:.2f}\t{time.time():.2f}\t{wid}\t{item.nodeid}\n")
