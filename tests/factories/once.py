"""Artifacts a whole test run shares, built once even under pytest-xdist."""

from __future__ import annotations

import fcntl
import json
import shutil
import stat
from pathlib import Path


def built_once(config, tmp_path_factory, name: str, build):
    """Build a read-only session artifact once for the whole run. Under pytest-xdist every
    worker is its own session, so the first worker to ask builds it into the run's common
    folder under a file lock and the others wait and reuse it (the recipe xdist documents):
    the real SmolLM2 bundle costs about two minutes, and building it per worker would eat the
    time the workers save. `build(folder)` returns what the fixture returns, a path inside
    `folder` or a dict of them."""
    # workerinput, not the PYTEST_XDIST_WORKER variable: a test's own pytest subprocess (the
    # dependency floors) inherits the variable but is a session of its own.
    if not hasattr(config, "workerinput"):
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent      # shared by the workers of this run
    folder, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with open(root / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)   # a worker that failed mid-build
            folder.mkdir()
            result = build(folder)
            done.write_text(json.dumps({k: str(v) for k, v in result.items()}
                                       if isinstance(result, dict) else str(result)))
        kept = json.loads(done.read_text())
        return {k: Path(v) for k, v in kept.items()} if isinstance(kept, dict) else Path(kept)


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every file under `folder` with its size and modification time: what a test that wrote
    into a shared artifact would change."""
    out = []
    for p in Path(folder).rglob("*"):
        st = p.stat()
        if stat.S_ISREG(st.st_mode):     # one stat a file, not three
            out.append((str(p.relative_to(folder)), st.st_size, st.st_mtime_ns))
    return sorted(out)


def unchanged(folder: Path, before: list) -> None:
    """Fail the run (at the fixture's teardown) when a test wrote into a shared artifact: the
    tests that read it after would see another artifact depending on the order they ran in,
    which a parallel run changes."""
    after = listing(folder)
    if after != before:
        changed = sorted(set(map(str, after)) ^ set(map(str, before)))[:4]
        raise AssertionError(f"{folder}: a test changed this shared artifact ({changed}); "
                             "tests must copy it before writing")


def worker_cpus(env, cpus: list[int]) -> list[int] | None:
    """The CPUs a pytest-xdist worker keeps: worker i of n takes every n-th CPU from the i-th,
    so the workers never share one. None outside a worker, or where there are fewer CPUs than
    workers (the floors' own pytest run inherits the variables but sees one CPU)."""
    n = int(env.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    wid = env.get("PYTEST_XDIST_WORKER", "")
    if n > 1 and wid.startswith("gw") and len(cpus) >= n:
        return cpus[int(wid[2:]) % n::n]
    return None
