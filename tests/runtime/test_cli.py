"""The CLI on synthetic bundles (no graphs are loaded): routing, dry runs, errors, verify."""

from __future__ import annotations

import json

import pytest

from lsaq_runtime.cli import main
from factories.synthetic import write_bundle


@pytest.fixture
def bundle(tmp_path):
    return write_bundle(tmp_path / "b")


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_table(bundle, capsys):
    code, out, err = run(capsys, bundle, "--dry-run", "--memory-budget", "64GiB", "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:6] == ["variant", "fp16", "int8", "int4", "mixed", "avg"]
    assert [l for l in lines if l.startswith("*")][0].split()[1] == "fp16"
    assert "most precise variant that fits" in out


def test_options_before_bundle_and_env_budget(bundle, capsys, monkeypatch):
    _, out, _ = run(capsys, bundle, "--dry-run", "--json", "--memory-budget", "1TiB")
    int8_need = json.loads(out)["variants"][1]["need_bytes"]
    monkeypatch.setenv("LSAQ_MEMORY_BUDGET", f"{int8_need}B")
    code, out, err = run(capsys, "--dry-run", "--json", "--device", "cpu", bundle)
    assert code == 0, err
    d = json.loads(out)
    assert d["budget_bytes"] == int8_need and d["chosen"] == "int8"


def test_no_fit_is_one_line_exit_2(bundle, capsys):
    code, out, err = run(capsys, bundle, "--dry-run", "--memory-budget", "10MB", "--device", "cpu")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lsaq-run: error: no variant fits")
    assert "a larger --memory-budget" in err
    assert "variant" in out  # the table still shows every need


@pytest.mark.parametrize("args, message", [
    (["--memory-budget", "6 gigs"], "not a size"),
    (["--context", "999999"], "max_context"),
    (["--variant", "nope"], "unknown variant"),
    (["--device", "tpu"], "unknown device"),
])
def test_user_errors(bundle, capsys, args, message):
    code, _, err = run(capsys, bundle, "--dry-run", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_usage_error_is_not_a_traceback(capsys):
    code, _, err = run(capsys, "--max-new-tokens", "x")
    assert code == 2 and "Traceback" not in err


def test_verify_and_inspect(bundle, capsys):
    code, out, err = run(capsys, "verify", bundle)
    # intact files, but the synthetic "graphs" are text: verify reads every graph too
    assert code == 2 and "not a valid ONNX graph" in err and "sha256" not in err
    (bundle / "int8.cpu.onnx").write_bytes(b"X" * (bundle / "int8.cpu.onnx").stat().st_size)
    code, out, err = run(capsys, "verify", bundle)
    assert code == 2 and "int8.cpu.onnx: sha256 mismatch" in err
    code, out, _ = run(capsys, "inspect", bundle)
    assert code == 0 and "int4x03" in out


def test_missing_bundle(tmp_path, capsys):
    code, _, err = run(capsys, tmp_path / "nope", "hello")
    assert code == 2 and "no such bundle folder" in err
