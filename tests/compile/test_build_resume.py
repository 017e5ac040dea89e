"""`lsaq-compile build --resume`: a build killed mid-measurement continues where it stopped and
gives the bundle a build that was never killed gives; a record of other inputs is refused."""

import json
import os
import signal
import subprocess
import sys

import pytest

from lsaq_compile.bundle import read_manifest
from lsaq_compile.job import JOB_DIR, MEASUREMENTS
from factories.models import make_tiny_model

CLI = [sys.executable, "-m", "lsaq_compile.cli"]
# Measured sensitivity per linear (the exact measurement, resumed per linear; the default's
# streamed estimate is killed and resumed in test_measure.py), tables on the ladder, quality on
# held-out windows: the default profile's stages, at sizes that take seconds.
PROFILE = """
[scoring]
samples = 4
seq_len = 40
measure = "exact"
[build]
rungs = 2
quality_samples = 2
providers = ["cpu"]
"""


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _build(model, out, profile, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["build", str(model), "-o", str(out), "--profile", str(profile),
                                 *map(str, extra)], capture_output=True, text=True, timeout=900)


def _kill_mid_measurement(model, out, profile, after: int = 3, sig=signal.SIGKILL,
                          env=None) -> tuple[list[str], int]:
    """Start a build and send it `sig` once its log shows `after` linears measured; the lines
    it wrote (the last ones, after the signal, included) and its exit code."""
    # --remeasure: an earlier test's build may have kept a measurement of these inputs
    p = subprocess.Popen(CLI + ["build", str(model), "-o", str(out), "--profile", str(profile),
                                "--remeasure"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    seen, measured = [], 0
    for line in p.stderr:
        seen.append(line)
        measured += "scoring: layer " in line
        if measured >= after:
            os.killpg(p.pid, sig)
            break
    seen += p.stderr.readlines()
    p.wait()
    assert measured >= after, "".join(seen)
    return seen, p.returncode


def _variants(m: dict) -> list[tuple]:
    return [(v["name"], v["rank"], v["precisions"], v["tables"], v["weight_bytes"])
            for v in m["variants"]]


def _quality(m: dict) -> dict:
    return {v["name"]: v["quality"] for v in m["variants"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("resume") / "tiny-resume")


def test_killed_build_resumes_and_equals_an_unkilled_one(model, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "killed"
    _kill_mid_measurement(model, out, profile)
    (work,) = tmp_path.glob(".killed.lsaq-tmp-*")
    job = json.loads((work / JOB_DIR / "job.json").read_text())
    assert "scoring" not in job["done"] and job["done"][:2] == ["source", "calibration"]
    lines = (work / JOB_DIR / MEASUREMENTS).read_text().splitlines()
    total = 4 * 4 + 2                      # 4 layers x 4 linears, embedding table and LM head
    assert 2 <= len(lines) - 1 < total, "the build was not killed mid-measurement"
    assert not out.exists()

    # nothing to resume for another target: one line
    r = _build(model, tmp_path / "other", profile, "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    # a record of other inputs is refused in one line, and kept
    other = tmp_path / "other.toml"
    other.write_text(PROFILE.replace("rungs = 2", "rungs = 3"))
    r = _build(model, out, other, "--resume", "-q")
    assert r.returncode == 2 and "other inputs" in r.stderr and "profile" in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert len(list(tmp_path.glob(".killed.lsaq-tmp-*"))) == 1

    r = _build(model, out, profile, "--resume")
    assert r.returncode == 0, r.stderr
    reused = [x for x in r.stderr.splitlines() if "reusing" in x and "measurements" in x]
    assert reused and int(reused[0].split("reusing ")[1].split()[0]) >= 2, r.stderr
    assert "FP16 reference" in r.stderr                      # the rest was measured
    assert not list(tmp_path.glob(".killed.lsaq-tmp-*"))     # the working folder is gone
    assert not any(JOB_DIR in p.parts for p in out.rglob("*"))
    resumed = read_manifest(out)

    # the same build, never killed; beside it a dead build's folder of other inputs
    fresh = tmp_path / "fresh"
    stale = tmp_path / f".fresh.lsaq-tmp-{_dead_pid()}"
    (stale / JOB_DIR).mkdir(parents=True)
    (stale / JOB_DIR / "job.json").write_text("{}")
    r = _build(model, fresh, profile, "--remeasure")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and "reusing" not in r.stderr   # cleaned, as before --resume
    whole = read_manifest(fresh)
    assert _variants(resumed) == _variants(whole)
    assert resumed["scores"]["importance"] == pytest.approx(whole["scores"]["importance"], rel=1e-5)
    for name, q in _quality(whole).items():
        for k, v in q.items():
            assert _quality(resumed)[name][k] == pytest.approx(v, rel=1e-4, abs=1e-7), (name, k)


def _ours(folder) -> list:
    return [p.name for p in folder.iterdir() if p.name.startswith("lsaq-")]


def test_a_terminated_build_leaves_nothing_in_the_temporary_folder_and_resumes(model, tmp_path):
    """SIGTERM (`kill`, a service manager's stop) unwinds like Ctrl-C: one line, exit 143, the
    converted tokenizer's temporary folder removed (SIGTERM's default action left it), the
    job record kept for --resume."""
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    lines, rc = _kill_mid_measurement(model, tmp_path / "b", profile, sig=signal.SIGTERM,
                                       env=env)
    assert rc == 143, lines
    assert lines[-1].strip() == "terminated (SIGTERM); a build continues with --resume"
    assert not any("Traceback" in x for x in lines)
    assert not _ours(tmp)                                 # the tokenizer's folder is gone
    (work,) = tmp_path.glob(".b.lsaq-tmp-*")
    assert (work / JOB_DIR / MEASUREMENTS).is_file()
    r = subprocess.run(CLI + ["build", str(model), "-o", str(tmp_path / "b"), "--profile",
                              str(profile), "--resume"], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0 and "reusing" in r.stderr, r.stderr
    assert not _ours(tmp) and read_manifest(tmp_path / "b")["variants"]


def test_resume_reuses_finished_stages(model, tmp_path):
    """Killed after measuring: the resumed build measures nothing again. It may change what
    only the writer reads (it runs anew on every resume): here the quality engine, as after
    the graphs ran out of memory at the quality stage."""
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "b"
    p = subprocess.Popen(CLI + ["build", str(model), "-o", str(out), "--profile", str(profile)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    for line in p.stderr:
        if "quantizing:" in line:
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.wait()
    (work,) = tmp_path.glob(".b.lsaq-tmp-*")
    done = json.loads((work / JOB_DIR / "job.json").read_text())["done"]
    assert {"scoring", "plan"} <= set(done)
    r = _build(model, out, profile, "--resume", "--quality-engine", "streamed")
    assert r.returncode == 0, r.stderr
    assert "reusing the finished sensitivity scores" in r.stderr
    assert "scoring: layer" not in r.stderr and "allocating:" not in r.stderr
    m = read_manifest(out)
    assert m["variants"] and m["deployment"]["quality"]["engine"] == "torch-streamed"


def test_a_measurement_is_reused_by_every_later_build_of_the_same_inputs(model, tmp_path):
    """Measured once, kept: a build at other sizes takes it (and gives the same scores); other
    quantizers, other calibration, --remeasure or a damaged entry measure again."""
    env = {**os.environ, "LSAQ_CACHE_DIR": str(tmp_path / "cache")}

    def build(out, text, *extra):
        (tmp_path / f"{out}.toml").write_text(text)
        r = subprocess.run(CLI + ["build", str(model), "-o", str(tmp_path / out), "--profile",
                                  str(tmp_path / f"{out}.toml"), *extra],
                           capture_output=True, text=True, timeout=900, env=env)
        assert r.returncode == 0, r.stderr
        measured = "scoring: layer" in r.stderr
        reused = "reusing the sensitivity measurement of an earlier build" in r.stderr
        assert measured != reused, r.stderr
        return reused, read_manifest(tmp_path / out)["scores"]

    first = build("a", PROFILE)[1]
    (entry,) = (tmp_path / "cache" / "measurements").glob("*.json")
    reused, scores = build("b", PROFILE.replace("rungs = 2", "rungs = 3"))       # other sizes
    assert reused and scores["importance"] == first["importance"]
    assert build("c", PROFILE, "--remeasure")[0] is False
    assert build("d", PROFILE + "[quantization]\nclip = \"mse\"\n")[0] is False   # other quantizers
    assert build("e", PROFILE.replace("seq_len = 40", "seq_len = 36"))[0] is False  # other windows
    entry.write_text(entry.read_text()[:100])                                  # damaged: measured again
    assert build("f", PROFILE)[0] is False
    assert build("g", PROFILE)[0] is True                                      # and kept again


def test_a_measurement_is_kept_per_device_and_compute_dtype(monkeypatch):
    """float16 on a GPU measures other numbers than float32 on a CPU: a measurement stored by
    one is never taken by the other, nor by a build that fell back to float32 on the GPU."""
    from types import SimpleNamespace

    from lsaq_compile import measurements
    from lsaq_compile.profiles import load_profile
    from lsaq_compile.quantize import QuantSettings

    def ctx(device, dtype=None):
        return SimpleNamespace(profile=load_profile("default"), metric="sensitivity",
                               source=SimpleNamespace(fingerprint=lambda: "model"),
                               settings=QuantSettings(), device=device, dtype=dtype)

    cpu = measurements.key(ctx("cpu"), "w")
    assert measurements.key(ctx("cpu"), "w") == cpu
    monkeypatch.setattr("lsaq_compile.devices.device_type", lambda d: d or "cpu")
    keys = {cpu, measurements.key(ctx("cuda"), "w"), measurements.key(ctx("cuda", "float32"), "w")}
    assert len(keys) == 3
