"""The examples users copy must keep running: each is run as a script, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO)])}


def example(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *map(str, args)],
                          capture_output=True, text=True, env=ENV, timeout=600)


def test_choose_variant(tiny_bundle):
    r = example("choose_variant.py", tiny_bundle)
    assert r.returncode == 0, r.stderr
    assert "fp16" in r.stdout and "int4" in r.stdout


@pytest.mark.slow
def test_embed_runtime(smollm_bundle):
    r = example("embed_runtime.py", smollm_bundle, "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stdout.count("> ") == 2            # two questions, two streamed replies


def test_compile_model(tiny_llama_dir, tmp_path):
    r = example("compile_model.py", tiny_llama_dir, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if (p / "manifest.json").is_file())


def test_examples_import_only_the_public_api():
    """Examples are what users copy: they import top-level names of lsaq_compile and
    lsaq_runtime only, never an internal module."""
    import ast
    import importlib

    ours = {"lsaq_compile", "lsaq_runtime"}
    for path in sorted((REPO / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                if top in ours:
                    assert node.module == top and node.level == 0, (path.name, node.module)
                    package = importlib.import_module(top)
                    for alias in node.names:
                        assert alias.name in package.__all__, (path.name, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in ours:
                        assert alias.name in ours, (path.name, alias.name)
