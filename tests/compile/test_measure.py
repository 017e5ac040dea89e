"""scoring.measure = "fisher" in the build: profile and CLI settings, resume after a kill in the
middle of the streamed sweep, no whole-model meter, and --device."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from factories.models import make_tiny_model
from lsaq_compile import devices
from lsaq_compile import estimate as E
from lsaq_compile import sensitivity
from lsaq_compile.bundle import build_bundle, read_manifest
from lsaq_compile.errors import LsaqError
from lsaq_compile.job import JOB_DIR, MEASUREMENTS, MeasurementLog
from lsaq_compile.model_source import open_model
from lsaq_compile.profiles import load_profile
from lsaq_compile.progress import Progress
from lsaq_compile.quantize import schemes_for

CLI = [sys.executable, "-m", "lsaq_compile.cli"]
PROFILE = """
[scoring]
samples = 4
seq_len = 40
measure = "fisher"
probes = 4
[build]
rungs = 2
quality_samples = 2
providers = ["cpu"]
"""
SCHEMES = schemes_for("group", 32, False, 32, "mse")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("measure") / "tiny-measure")


@pytest.fixture()
def profile(tmp_path):
    p = tmp_path / "fisher.toml"
    p.write_text(PROFILE)
    return p


def _build(model, out, profile, *extra):
    return subprocess.run(CLI + ["build", str(model), "-o", str(out), "--profile", str(profile),
                                 *map(str, extra)], capture_output=True, text=True, timeout=900)


def test_profile_measure_and_probes_are_checked(tmp_path):
    assert load_profile("default").scoring.measure in ("exact", "fisher")
    bad = tmp_path / "bad.toml"
    bad.write_text('[scoring]\nmeasure = "exactly"\n')
    with pytest.raises(LsaqError) as e:
        load_profile(str(bad))
    assert "scoring.measure" in str(e.value) and "\n" not in str(e.value)
    bad.write_text('[scoring]\nmeasure = "fisher"\nprobes = 0\n')
    with pytest.raises(LsaqError, match="scoring.probes must be at least 1"):
        load_profile(str(bad))


def test_cli_measure_override_and_bad_values(model, tmp_path, profile):
    r = _build(model, tmp_path / "b", profile, "--measure", "approx")
    assert r.returncode == 2 and "--measure" in r.stderr
    with pytest.raises(LsaqError, match="scoring.measure"):
        build_bundle(model, tmp_path / "c", profile=str(profile), measure="approx",
                     progress=Progress(quiet=True))
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(CUDA, reason="refusal is for a machine without CUDA")
def test_device_cuda_is_refused_without_cuda_in_one_line(model, tmp_path, profile):
    r = _build(model, tmp_path / "b", profile, "--device", "cuda")
    assert r.returncode == 2, r.stderr
    assert "cuda" in r.stderr and r.stderr.strip().count("\n") == 0
    assert "Traceback" not in r.stderr and not (tmp_path / "b").exists()
    r = _build(model, tmp_path / "b", profile, "--device", "cuda:x")
    assert r.returncode == 2 and "use auto, cpu or cuda" in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and not (tmp_path / "b").exists()
    # auto falls back to the CPU
    with pytest.raises(LsaqError, match="no CUDA"):
        E._device("cuda")
    assert E._device("auto").type == "cpu"


def test_device_names_are_checked_in_one_line(monkeypatch):
    """--device takes auto, cpu, cuda or cuda:N, N a GPU torch sees; anything else is one line
    naming what to use (not torch's RuntimeError from deep inside a stage)."""
    for bad in ("cuda:abc", "cpu:0", "tpu", "cuda:", "CUDA"):
        with pytest.raises(LsaqError, match="use auto, cpu or cuda"):
            devices._device(bad)
    assert devices._device(torch.device("cpu")).type == "cpu"
    assert devices.device_type(None) == devices.device_type("auto") == ("cuda" if CUDA else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices._device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(LsaqError, match="sees 2 CUDA device"):
        devices._device("cuda:2")


def test_an_exact_measurement_is_checked_against_the_gpus_free_memory(model, tmp_path, profile,
                                                                        monkeypatch):
    """The exact meter holds the whole model and its candidates on the device it computes on:
    on a GPU with too little free memory it is refused before it starts, in one line that
    names the streamed measurement (simulated: the device reported as cuda, 1 MiB free)."""
    from lsaq_compile.stages import scoring

    monkeypatch.setattr(scoring, "device_type", lambda device: "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
    started = []
    monkeypatch.setattr(sensitivity.KLMeter, "__init__", lambda *a, **k: started.append(1))
    with pytest.raises(LsaqError) as e:
        build_bundle(model, tmp_path / "b", profile=str(profile), measure="exact",
                     progress=Progress(quiet=True))
    msg = str(e.value)
    assert "GPU" in msg and "fisher" in msg and "\n" not in msg and not started


def test_fisher_build_never_builds_the_whole_model_meter(model, tmp_path, profile, monkeypatch):
    """The exact meter holds every layer (float32 and both quantized copies); the fisher
    build must not construct it, for the scores or for the whole-plan checks."""
    def refuse(*a, **k):
        raise AssertionError("KLMeter built by a fisher build")

    monkeypatch.setattr(sensitivity.KLMeter, "__init__", refuse)
    out = build_bundle(model, tmp_path / "b", profile=str(profile),
                       progress=Progress(quiet=True))
    m = read_manifest(out)
    assert m["scores"]["params"]["measure"] == "fisher"
    assert m["scores"]["params"]["probes"] == 4
    assert set(m["scores"]["params"]["tables"]) == {"embed_tokens", "lm_head"}
    names = [v["name"] for v in m["variants"]]
    assert names[:2] == ["fp16", "mix10.81"] or names[0] == "fp16"
    assert names[-1] == "int4"
    # the plans' KLs the writer records are whole-plan measurements (streamed), not additive
    kls = [v["quality"]["kl"] for v in m["variants"][1:]]
    assert all(k > 0 for k in kls)


def _scores(src, win, log=None, ckpt=None, probes=4):
    calib = type("Calib", (), {"source": "test", "sha256": "0"})()
    return E.score(src, calib, win, SCHEMES, None, granularity="linear", tables=True, log=log,
                   probes=probes, checkpoint_dir=ckpt)



def _die_at_layer_call(monkeypatch, n: int):
    """The n-th layer of the backward sweep raises KeyboardInterrupt, as a kill there would.
    Returns (the real layer_costs, the list of calls so far)."""
    real, calls = E.layer_costs, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(E, "layer_costs", dying)
    return real, calls

def test_fisher_scoring_resumes_where_it_was_killed(model, tmp_path, monkeypatch):
    """Killed after two layers of the backward sweep: the rerun measures only the rest (from
    the saved gradient, not from the top) and gives what an unkilled run gives."""
    src = open_model(model)
    win = np.random.default_rng(3).integers(3, 512, size=(4, 24))
    whole = _scores(src, win)
    L = src.spec.num_layers

    log = MeasurementLog(tmp_path / MEASUREMENTS, "key-1")
    real, calls = _die_at_layer_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _scores(src, win, log, tmp_path / "ckpt")
    known = log.read()
    assert {k for k in known if k[0] == "layer"} == {("layer", i, u) for i in (L - 1, L - 2)
                                                      for u in sensitivity.PARTS}
    assert {k for k in known if k[0] == "table"} == {("table", "embed_tokens"), ("table", "lm_head")}
    # a line cut short by the kill is ignored, not taken for a measurement
    with open(log.path, "a") as f:
        f.write('{"key": ["layer", 0, "qkv"], "co')

    calls.clear()
    monkeypatch.setattr(E, "layer_costs", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    grads = []
    real_head = E._head_grad
    monkeypatch.setattr(E, "_head_grad", lambda *a, **k: (grads.append(1), real_head(*a, **k))[1])
    resumed = _scores(src, win, log, tmp_path / "ckpt")
    assert len(calls) == L - 2 and not grads       # the rest only, from the saved gradient
    assert not list((tmp_path / "ckpt").glob("fisher-*"))   # checkpoint removed when whole
    for u in whole.params["cost"]:
        for i in range(L):
            for p in ("int8", "int4"):
                assert resumed.params["cost"][u][i][p] == pytest.approx(
                    whole.params["cost"][u][i][p], rel=1e-5), (u, i, p)
    for t, c in whole.params["tables"].items():
        assert resumed.params["tables"][t] == pytest.approx(c, rel=1e-6), t

    # a log of other inputs is refused, never reused
    with pytest.raises(LsaqError, match="other inputs"):
        _scores(src, win, MeasurementLog(tmp_path / MEASUREMENTS, "key-2"), tmp_path / "ckpt")


def test_killed_fisher_build_resumes_and_equals_an_unkilled_one(model, tmp_path, profile):
    out = tmp_path / "killed"
    p = subprocess.Popen(CLI + ["build", str(model), "-o", str(out), "--profile", str(profile)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    seen, steps = [], 0
    for line in p.stderr:
        seen.append(line)
        steps += "scoring: backward: layer " in line
        if steps >= 2:
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert steps >= 2, "".join(seen)
    # progress a person can read: stage, layer, rate, ETA
    step = next(x for x in seen if "scoring: backward: layer 1/4" in x)
    assert "layers/min" in step and "left" in step
    (work,) = tmp_path.glob(".killed.lsaq-tmp-*")
    job = json.loads((work / JOB_DIR / "job.json").read_text())
    assert "scoring" not in job["done"]
    lines = (work / JOB_DIR / MEASUREMENTS).read_text().splitlines()
    assert 2 + 4 <= len(lines) - 1 < 2 + 16, "the build was not killed mid-measurement"

    r = _build(model, out, profile, "--resume")
    assert r.returncode == 0, r.stderr
    assert "reusing" in r.stderr and "backward: layer 1/4" not in r.stderr
    assert "tables plans" not in r.stderr                 # the tables were not measured again
    resumed = read_manifest(out)
    r = _build(model, tmp_path / "fresh", profile)
    assert r.returncode == 0, r.stderr
    whole = read_manifest(tmp_path / "fresh")
    assert [v["name"] for v in resumed["variants"]] == [v["name"] for v in whole["variants"]]
    assert [v["precisions"] for v in resumed["variants"]] == \
        [v["precisions"] for v in whole["variants"]]
    assert resumed["scores"]["importance"] == pytest.approx(whole["scores"]["importance"],
                                                            rel=1e-5)


def test_cpu_measurement_and_cuda_cross_check(model):
    """The CPU path always; on a machine with CUDA, the same estimate and whole-plan KLs in
    float16 on the GPU agree with it (ranking and scale)."""
    from scipy.stats import spearmanr

    src = open_model(model)
    win = np.random.default_rng(4).integers(3, 512, size=(4, 32))
    cpu = E.estimate(src, win, SCHEMES, probes=4, seed=0, device="cpu")
    plans = [(("int4",) * 4, {"embed_tokens": "int8"}), (("int8",) * 4, {"lm_head": "int4"})]
    kl_cpu = E.plans_kl(src, win, SCHEMES, plans, device="cpu")
    meter = sensitivity.KLMeter(src, win, SCHEMES)
    np.testing.assert_allclose(kl_cpu, [meter.kl(p, t) for p, t in plans], rtol=1e-4)
    if not CUDA:
        pytest.skip("no CUDA here: the CPU path is checked, the GPU cross-check is skipped")
    gpu = E.estimate(src, win, SCHEMES, probes=4, seed=0, device="cuda")
    f = lambda e: np.array([c[u][i][p] for c in [e.cost()] for u in c  # noqa: E731
                            for i in range(4) for p in ("int8", "int4")])
    assert spearmanr(f(cpu), f(gpu))[0] > 0.98
    assert np.median(np.abs(np.log(f(gpu) / f(cpu)))) < 0.05
    kl_gpu = E.plans_kl(src, win, SCHEMES, plans, device="cuda")
    np.testing.assert_allclose(kl_gpu, kl_cpu, rtol=0.05)
    # the exact meter on the GPU (float32 there): the same KLs
    on_gpu = sensitivity.KLMeter(src, win, SCHEMES, device="cuda")
    np.testing.assert_allclose([on_gpu.kl(p, t) for p, t in plans], kl_cpu, rtol=1e-3)
    # activation statistics in float16 on the GPU
    from lsaq_compile.activations import activation_stats

    a_cpu, a_gpu = activation_stats(src, win), activation_stats(src, win, device="cuda")
    for k, v in a_cpu.items():
        np.testing.assert_allclose(a_gpu[k], v, rtol=0.02, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="no CUDA here: run by tools/device_check/run.sh on a GPU")
def test_a_cuda_build_ships_what_a_cpu_build_ships(model, tmp_path, profile):
    """The whole build with every torch stage on the GPU (float16): the same ladder of
    variants as the CPU's float32 build, its scores ranking the linears alike, each variant's
    held-out KL close, and torch's GPU peak on the log's last line."""
    from scipy.stats import spearmanr

    cpu = read_manifest(build_bundle(model, tmp_path / "cpu", profile=str(profile),
                                     progress=Progress(quiet=True)))
    r = _build(model, tmp_path / "gpu", profile, "--device", "cuda", "--remeasure")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GPU memory: peak" in r.stderr.strip().splitlines()[-1]
    gpu = read_manifest(tmp_path / "gpu")
    assert len(gpu["variants"]) == len(cpu["variants"])
    a, b = cpu["scores"]["importance"], gpu["scores"]["importance"]
    assert spearmanr(a, b).statistic > 0.9, (a, b)
    # a mix's name is its size, which a slightly other measurement may move; the uniform
    # rungs are the same weights whatever was measured
    kl = {v["name"]: v["quality"]["kl_fp16"] for v in gpu["variants"]}
    same = [v for v in cpu["variants"] if v["name"] in kl]
    assert {"fp16", "int8"} <= {v["name"] for v in same}
    for v in same:
        kx, ky = v["quality"]["kl_fp16"], kl[v["name"]]
        assert abs(kx - ky) <= 0.1 * max(kx, ky) + 1e-4, (v["name"], kx, ky)


def test_a_measurement_that_cannot_fit_is_refused_before_it_starts(model, tmp_path, profile,
                                                                   monkeypatch):
    """The estimate of the measurement's memory against what the host has: refused in one
    line with both numbers (and the streamed alternative) before any measurement."""
    from lsaq_compile.model_source import open_model as om
    from lsaq_compile.stages import scoring
    from lsaq_runtime import probe

    spec = om(model).spec
    assert scoring.memory_need(spec, "fisher", 4, 128) > 0
    # a 7B-shaped model: the exact meter needs tens of GiB, the streamed one a few
    from types import SimpleNamespace

    big = SimpleNamespace(num_layers=32, hidden_size=4096, vocab_size=32000)
    monkeypatch.setattr("lsaq_compile.plan.part_params", lambda s: {
        "qkv": 3 * 4096 * 4096, "o": 4096 * 4096, "gate_up": 2 * 4096 * 11008,
        "down": 4096 * 11008})
    assert scoring.memory_need(big, "exact", 4, 128, tied=False) > 60 * scoring.GiB
    assert scoring.memory_need(big, "fisher", 4, 128, tied=False) < 6 * scoring.GiB
    monkeypatch.undo()

    host = probe.probe_host()
    monkeypatch.setattr(probe, "probe_host", lambda: probe.simulated(host, 1 << 20))
    started = []
    monkeypatch.setattr(E, "estimate", lambda *a, **k: started.append(1))
    with pytest.raises(LsaqError) as e:
        build_bundle(model, tmp_path / "b", profile=str(profile), progress=Progress(quiet=True))
    msg = str(e.value)
    assert "GiB" in msg and "available" in msg and "\n" not in msg and not started
    with pytest.raises(LsaqError, match="fisher"):
        build_bundle(model, tmp_path / "b", profile=str(profile), measure="exact",
                     progress=Progress(quiet=True))


def test_reused_exact_scores_check_memory_before_the_whole_model_meter(model, tmp_path, profile,
                                                                       monkeypatch):
    """An exact build whose scores an earlier build measured still builds the whole-model
    meter to check its plans: that too is refused before it starts where memory is short."""
    from lsaq_runtime import probe

    monkeypatch.setenv("LSAQ_CACHE_DIR", str(tmp_path / "cache"))
    build_bundle(model, tmp_path / "a", profile=str(profile), measure="exact",
                 progress=Progress(quiet=True))
    host = probe.probe_host()
    monkeypatch.setattr(probe, "probe_host", lambda: probe.simulated(host, 1 << 20))
    built = []
    real = sensitivity.KLMeter.__init__
    monkeypatch.setattr(sensitivity.KLMeter, "__init__",
                        lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    with pytest.raises(LsaqError, match="GiB of memory but") as e:   # fails without the check
        build_bundle(model, tmp_path / "b", profile=str(profile), measure="exact",
                     progress=Progress(quiet=True))
    assert not built and "\n" not in str(e.value)


def test_a_checkpoint_ahead_of_the_log_restarts_the_sweep(model, tmp_path, monkeypatch):
    """The gradient checkpoint says layers from L-2 up are done, but the log lost layer L-1's
    costs: the sweep starts again from the top rather than leave a layer unmeasured."""
    src = open_model(model)
    win = np.random.default_rng(5).integers(3, 512, size=(2, 24))
    whole = _scores(src, win, probes=2)
    L = src.spec.num_layers
    log = MeasurementLog(tmp_path / MEASUREMENTS, "key-1")
    real, calls = _die_at_layer_call(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _scores(src, win, log, tmp_path / "ckpt", probes=2)
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join(x for x in lines if f'"layer", {L - 1},' not in x) + "\n")
    monkeypatch.setattr(E, "layer_costs", real)
    grads = []
    real_head = E._head_grad
    monkeypatch.setattr(E, "_head_grad", lambda *a, **k: (grads.append(1), real_head(*a, **k))[1])
    again = _scores(src, win, log, tmp_path / "ckpt", probes=2)
    assert grads == [1]
    assert again.importance == pytest.approx(whole.importance, rel=1e-6)


def test_fisher_dtype_bfloat16_estimates_the_same_ranking(model, tmp_path, profile,
                                                           monkeypatch):
    """scoring.dtype = bfloat16 (about 2.3x faster on CPUs with bfloat16 instructions) runs the
    estimate in bfloat16: its per-linear costs rank the linears as float32's do, it is recorded
    in the scores, it is a measurement of its own (not reused for a float32 build, nor the
    reverse), it is refused on a CPU without bfloat16 instructions, and a bad value is one
    line."""
    from scipy.stats import spearmanr

    win = np.random.default_rng(0).integers(3, 200, size=(4, 40))
    src = open_model(model)
    costs = {}
    for dt in ("float32", "bfloat16"):
        sc = E.score(src, _Calib(), win, SCHEMES, probes=4, probe_dtype=dt)
        assert sc.params["dtype"] == dt
        costs[dt] = np.array([[c["int8"], c["int4"]] for u in sorted(sc.params["cost"])
                              for c in sc.params["cost"][u]])
    a, b = costs["float32"], costs["bfloat16"]
    assert np.all(b > 0) and not np.array_equal(a, b)   # really another computation
    for k in range(2):
        assert spearmanr(a[:, k], b[:, k]).statistic > 0.9, (a[:, k], b[:, k])
    assert np.median(np.abs(np.log(b / a))) < 0.15      # the same size, not just the order

    out = build_bundle(model, tmp_path / "b16", profile=str(profile),
                       progress=Progress(quiet=True))
    r = _build(model, tmp_path / "bf", profile, "--fisher-dtype", "bfloat16")
    if devices.cpu_half_slowdown("bfloat16") > devices.HALF_SLOWDOWN_MAX:
        # this CPU has no bfloat16 instructions (~200x slower than float32 on an AVX2-only
        # one): refused in one line before any work; the build below is made as if it had
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "slower than float32" in r.stderr and "--fisher-dtype float32" in r.stderr
        assert not (tmp_path / "bf").exists()
        monkeypatch.setattr(devices, "cpu_half_slowdown", lambda dtype: 1.0)
        prof = load_profile(str(profile))
        prof.scoring.dtype = "bfloat16"
        build_bundle(model, tmp_path / "bf", profile=prof, progress=Progress(quiet=True))
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        assert "reusing" not in r.stderr        # the float32 measurement above is not reused
    assert read_manifest(tmp_path / "bf")["scores"]["params"]["dtype"] == "bfloat16"
    assert read_manifest(out)["scores"]["params"]["dtype"] == "float32"
    bad = tmp_path / "bad.toml"
    bad.write_text('[scoring]\ndtype = "half"\n')
    with pytest.raises(LsaqError) as e:
        load_profile(str(bad))
    assert "scoring.dtype" in str(e.value) and "\n" not in str(e.value)


class _Calib:
    source, sha256 = "test", "0" * 64


def test_store_reads_the_estimates_candidates_and_writes_the_same_bytes(model, tmp_path,
                                                                           monkeypatch):
    """The fisher estimate keeps every linear it quantized; the store stage reads them instead
    of running the clipping search again (fused qkv and gate_up from their members' rows). The
    weight store must be byte for byte the one a fresh quantization writes, with the default
    profile's clip 'mse-act' and zero points."""
    from lsaq_compile import export_onnx, quantize as Q
    from lsaq_compile.stages import store

    prof = tmp_path / "p.toml"
    prof.write_text(PROFILE.replace('[build]', '[build]\nladder = "full"'))
    calls = {"n": 0}
    real = export_onnx.quantize

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(export_onnx, "quantize", counted)
    kept = build_bundle(model, tmp_path / "kept", profile=str(prof), progress=Progress(quiet=True))
    with_kept = calls["n"]
    monkeypatch.setattr(store, "_candidates", lambda job: None)
    calls["n"] = 0
    fresh = build_bundle(model, tmp_path / "fresh", profile=str(prof), remeasure=True,
                         progress=Progress(quiet=True))
    # the fresh store quantized every decoder linear; the kept one only the token tables
    assert calls["n"] > with_kept and with_kept <= 4, (with_kept, calls["n"])
    files = sorted(p.name for p in (kept / "weights").iterdir())
    assert files == sorted(p.name for p in (fresh / "weights").iterdir()) and len(files) >= 2
    for name in files:
        assert (kept / "weights" / name).read_bytes() == (fresh / "weights" / name).read_bytes(), name
    assert read_manifest(kept)["variants"] == read_manifest(fresh)["variants"]
    assert Q.load_candidate(tmp_path / "none.npz", Q.schemes_for("group", 32, False, 32, "mse")["int4"]) is None


def test_a_half_precision_estimate_is_refused_where_the_cpu_lacks_it(model, tmp_path,
                                                                     monkeypatch):
    """The refusal depends on the measured slowdown, not on a flag list: refused above
    HALF_SLOWDOWN_MAX (one line, nothing written), taken below it, never asked for float32,
    auto, another metric or a CUDA device; the measurement itself gives a finite ratio."""
    from lsaq_compile.build import check_compute_dtype

    ratio = devices.cpu_half_slowdown("float16")
    assert 0 < ratio < float("inf")
    asked = []
    monkeypatch.setattr(devices, "cpu_half_slowdown", lambda d: asked.append(d) or 200.0)
    prof = load_profile("default")
    prof.scoring.dtype = "float16"
    with pytest.raises(LsaqError) as e:
        build_bundle(model, tmp_path / "out", profile=prof, progress=Progress(quiet=True))
    assert "float16 matrices 200x slower than float32" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    check_compute_dtype("cuda", prof)
    check_compute_dtype("cpu", prof, metric="jaccard")
    for dt in ("auto", "float32"):
        prof.scoring.dtype = dt
        check_compute_dtype("cpu", prof)
    assert asked == ["float16"]
    monkeypatch.setattr(devices, "cpu_half_slowdown", lambda d: 1.5)
    prof.scoring.dtype = "bfloat16"
    check_compute_dtype("cpu", prof)
