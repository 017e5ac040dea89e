"""The dependency floors pyproject declares are installed and run, not just written down.

Runtime: a fresh venv gets exactly the `>=` floor of every runtime dependency (`==` pinned, from
pyproject itself) and runs every variant of a bundle; its logits must match the project's own
environment. Compiler: the compile extra's floors are laid over the project's environment
(`pip install --no-deps --target`, shadowing the newer copies) and the tests that use them run.
Server: the serve extra's floors are laid over the same way and the server's tests run on them.
All need PyPI and take a few minutes, so they run when LSAQ_FLOOR_CHECKS=1 (.ci/run sets it)
and are skipped in a plain `pytest`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from factories.once import built_once

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(os.environ.get("LSAQ_FLOOR_CHECKS") != "1",
                                reason="dependency floors are checked in CI (LSAQ_FLOOR_CHECKS=1)")
# transformers' floor requires these at least (its own pins); they are not LSAQ's choices.
TRANSFORMERS_COMPANIONS = {"transformers": ["tokenizers==0.22.0", "huggingface-hub==0.34.0"]}
# The one torch this machine can install is also the declared floor; it is the project's own.
NOT_OVERLAID = {"torch"}


def floors(requirements: list[str]) -> dict[str, str]:
    """name -> floor version of every 'name>=X' requirement."""
    out = {}
    for r in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)", r)
        assert m, f"requirement without a floor: {r!r}"
        out[m.group(1).lower()] = m.group(2)
    return out


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pip(python: str, *args: str) -> None:
    r = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        "--only-binary", ":all:", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def test_runtime_floors(tiny_bundle, tmp_path):
    pins = [f"{n}=={v}" for n, v in floors(project()["dependencies"]).items()]
    venv = tmp_path / "venv-floor"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip(py, "--no-compile", *pins)
    check = REPO / "tests" / "contract" / "floors" / "runtime_check.py"
    env = {**os.environ, "PYTHONPATH": str(REPO / "runtime")}
    outs = {}
    for name, python in (("floor", py), ("project", sys.executable)):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([python, str(check), str(tiny_bundle), str(out)], env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stderr[-3000:]}"
        outs[name] = json.loads(out.read_text())
    floor, ours = outs["floor"], outs["project"]
    from packaging.version import Version

    assert {k: Version(v) for k, v in floor["versions"].items()} == \
        {p.split("==")[0]: Version(p.split("==")[1]) for p in pins}, floor["versions"]
    print(f"runtime floors {floor['versions']} against {ours['versions']}")
    assert floor["variants"].keys() == ours["variants"].keys()
    for name in ours["variants"]:
        for part in ("prefill", "decode"):
            a, b = np.asarray(floor["variants"][name][part]), np.asarray(ours["variants"][name][part])
            assert np.abs(a - b).max() <= 1e-3 * max(1.0, np.abs(b).max()), (name, part)
    assert floor["chat"] == ours["chat"] and floor["dry_run_exit"] == 0


@pytest.fixture(scope="session")
def compile_overlay(pytestconfig, tmp_path_factory) -> Path:
    """The compile extra's floors installed once per run (shared by the chunks below, and by
    pytest-xdist's workers): a folder to put first on PYTHONPATH."""
    extra = floors(project()["optional-dependencies"]["compile"])
    pins = [f"{n}=={v}" for n, v in extra.items() if n not in NOT_OVERLAID]
    for n in extra:
        pins += TRANSFORMERS_COMPANIONS.get(n, [])

    def install(folder: Path) -> Path:
        overlay = folder / "overlay"
        pip(sys.executable, "--no-deps", "--target", str(overlay), *pins)
        (folder / "pins.txt").write_text(" ".join(pins))
        return overlay

    return built_once(pytestconfig, tmp_path_factory, "compile-floors", install)


# Every test of the compile side, in chunks that pytest-xdist's workers run side by side (the
# whole list takes about 8 CPU-minutes). Not lm-eval's (adapter test deselected, the others
# skip on LSAQ_SKIP_LM_EVAL): that is the eval extra, whose newer `datasets` wants a newer
# huggingface-hub than transformers' floor pairs with.
COMPILE_CHUNKS = {
    "scoring": ["tests/compile/test_importance.py", "tests/compile/test_study.py",
                "tests/compile/test_calibration.py", "tests/compile/test_profiles.py",
                "tests/runtime/test_probe.py"],
    "build": ["tests/compile/test_bundle.py", "tests/compile/test_plan.py",
              "tests/compile/test_quantize.py", "tests/compile/test_store.py"],
    "sources": ["tests/compile/test_source.py", "tests/compile/test_graph.py",
                "tests/compile/test_families.py", "tests/contract/test_bad_inputs.py",
                "tests/compile/test_evaluate.py"],
}


@pytest.mark.parametrize("chunk", list(COMPILE_CHUNKS))
def test_compile_floors(compile_overlay, chunk, tmp_path):
    extra = floors(project()["optional-dependencies"]["compile"])
    env = {**os.environ, "PYTHONPATH": str(compile_overlay)}
    probe = subprocess.run([sys.executable, "-c", "import transformers, onnx, gguf, safetensors;"
                            "print(transformers.__version__, transformers.__file__)"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode == 0 and str(compile_overlay) in probe.stdout, probe.stderr[-2000:]
    from packaging.version import Version

    assert Version(probe.stdout.split()[0]) == Version(extra["transformers"])
    # `-m "not slow"`: the real-model builds and the quick study exercise no API the tiny models
    # do not, and would double CI's time; the main run has them on the project's versions.
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "not slow", "--basetemp", str(tmp_path / "pt"), *COMPILE_CHUNKS[chunk],
                        "--deselect", "tests/compile/test_evaluate.py::test_lm_eval_adapter_with_a_local_task"],
                       cwd=REPO, env={**env, "LSAQ_FLOOR_CHECKS": "0", "LSAQ_SKIP_LM_EVAL": "1"},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    pins = (compile_overlay.parent / "pins.txt").read_text()
    print(f"compile floors ({chunk}) {pins}: {r.stdout.strip().splitlines()[-1]}")


def test_serve_floors(tmp_path):
    extra = floors(project()["optional-dependencies"]["serve"])
    pins = [f"{n}=={v}" for n, v in extra.items()]
    overlay = tmp_path / "overlay"
    pip(sys.executable, "--no-deps", "--target", str(overlay), *pins)
    env = {**os.environ, "PYTHONPATH": str(overlay)}
    probe = subprocess.run([sys.executable, "-c", "import json, starlette, uvicorn, h11;"
                            "print(json.dumps({'starlette': starlette.__version__, 'uvicorn': "
                            "uvicorn.__version__, 'h11': h11.__version__, 'at': starlette.__file__}))"],
                           env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    got = json.loads(probe.stdout)
    from packaging.version import Version

    assert str(overlay) in got.pop("at")
    assert {k: Version(v) for k, v in got.items()} == {k: Version(v) for k, v in extra.items()}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        "-m", "not slow", "--basetemp", str(tmp_path / "pt"), "tests/serve/test_server.py"],
                       cwd=REPO, env={**env, "LSAQ_FLOOR_CHECKS": "0"}, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    print(f"serve floors {pins}: {r.stdout.strip().splitlines()[-1]}")
