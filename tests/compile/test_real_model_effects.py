"""What tiny random models hide and real checkpoints show, made to show on purpose (issue 20):
a model whose predictions depend on BOS, a residual stream past float16's range, measurement
noise that would rank a coarser variant first, and a vocabulary large enough to dominate memory.

The model: a tiny Gemma 3 whose tokenizer starts every sequence with BOS and whose BOS embedding
row is huge, as real models' first position is (a real Gemma 3 270M reaches |h| = 103,795 at
BOS; x sqrt(hidden) here gives 96,000). Attention to that position dominates, so windows with
and without BOS score very differently, and the float16 residual overflows at BOS.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from factories.bundles import small_profile
from factories.data import C4, WIKITEXT
from factories.models import add_bos_to_tokenizer, make_large_vocab_model, make_tiny_family


BOS, HUGE = 1, 12000.0


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    path = make_tiny_family(tmp_path_factory.mktemp("bos") / "hf", "gemma3")
    f = path / "model.safetensors"
    t = load_file(f)
    g = torch.Generator().manual_seed(0)
    t["model.embed_tokens.weight"][BOS] = HUGE * torch.sign(torch.randn(t["model.embed_tokens.weight"].shape[1], generator=g))
    save_file(t, f, metadata={"format": "pt"})
    add_bos_to_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def bos_bundle(bos_model, tmp_path_factory):
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    prof = small_profile(samples=2, seq_len=32)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 2, 0, 4
    out = tmp_path_factory.mktemp("bos-bundle") / "b"
    return build_bundle(bos_model, out, profile=prof, progress=Progress(quiet=True))


def _transformers_ppl(model_dir, windows: np.ndarray) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.from_numpy(windows)).logits[:, :-1].double()
    lp = torch.log_softmax(logits, -1)
    nll = -lp.gather(-1, torch.from_numpy(windows[:, 1:, None])).sum()
    return math.exp(float(nll) / (windows.shape[0] * (windows.shape[1] - 1)))


def test_every_scored_window_starts_as_a_prompt_does(bos_model, bos_bundle):
    """Calibration, held-out quality and evaluation windows are framed by the runtime's codec:
    BOS first for this model, exactly the ids `lsaq-run` would feed."""
    from lsaq_compile import evaluate as ev
    from lsaq_compile.bundle import read_manifest
    from lsaq_compile.calibration import load_calibration, load_tokenizer
    from lsaq_compile.model_source import open_model
    from lsaq_runtime.text import TextCodec

    source = open_model(bos_model)
    codec = load_tokenizer(source)
    assert codec.prefix == [BOS]
    cal = load_calibration(C4, codec, samples=3, seq_len=40, held_out=2)
    assert (cal.windows[:, 0] == BOS).all() and (cal.held_out[:, 0] == BOS).all()
    assert (cal.windows[:, 1:] != BOS).any()
    # the text after BOS is the same stream an unframed codec cuts (seq_len - 1 tokens a window)
    folder, facts = source.saved_tokenizer()
    plain = TextCodec.from_files(folder / "tokenizer.json", {**facts, "add_bos_token": False}, 512)
    unframed = load_calibration(C4, plain, samples=3, seq_len=40)
    assert unframed.sha256 != cal.sha256 and (unframed.windows[:, 0] != BOS).all()
    m = read_manifest(bos_bundle)
    assert m["tokenizer"]["add_bos_token"] and m["deployment"]["quality"]["prefix"] == [BOS]
    tw = ev.text_windows(WIKITEXT, bos_bundle, 64, 2)
    assert (tw.windows[:, 0] == BOS).all() and tw.prefix == (BOS,)
    assert ev.encoder(bos_bundle)("hello")[0] == BOS


def test_perplexity_is_measured_with_bos(bos_model, bos_bundle):
    """The bundle's perplexity equals transformers' on the same BOS-framed windows, and this
    model really depends on BOS: without it perplexity is another number altogether."""
    from lsaq_compile import evaluate as ev
    from lsaq_compile.bundle import read_manifest

    tw = ev.text_windows(WIKITEXT, bos_bundle, 64, 3)
    fn = ev.onnx_logits_fn(bos_bundle, read_manifest(bos_bundle), "fp16", context=64)
    ours = ev.perplexity(fn, tw)["perplexity"]
    fn.close()
    with_bos = _transformers_ppl(bos_model, tw.windows)
    without = _transformers_ppl(bos_model, tw.windows[:, 1:])
    assert ours == pytest.approx(with_bos, rel=5e-3)
    assert abs(math.log(without / with_bos)) > 0.05


def test_float16_graphs_keep_a_float32_residual_where_float16_overflows(bos_model, bos_bundle):
    """Found at build time on calibration text (run on the CPU provider) and recorded in the
    manifest: the float16 graph with a float16 residual returns non-finite logits when BOS comes
    first; the shipped float16 graphs keep the residual stream and norms in float32 and match
    the float32 graph."""
    from lsaq_compile.bundle import read_manifest
    from lsaq_compile.export_onnx import build_graph
    from lsaq_compile.model_source import open_model
    from lsaq_compile.store import read_index
    from lsaq_runtime.session import Runner, create_session

    m = read_manifest(bos_bundle)
    check = m["build_checks"]["float16"]
    assert check["finite_with_float16_residual"] is False
    assert check["residual_dtype"] == "float32" and check["finite_with_float32_residual"]
    assert {v["providers"]["cuda"]["residual_dtype"] for v in m["variants"]} == {"float32"}
    assert {v["providers"]["cpu"]["residual_dtype"] for v in m["variants"]} == {"float32"}

    ids = [BOS] + list(range(10, 40))

    def logits(graph_bytes, dtype):
        session = create_session(bos_bundle / "check.onnx", "cpu", data=graph_bytes)
        r = Runner(session, m, dtype, len(ids), "cpu")
        out = r.run(ids, 0, len(ids)).copy()
        r.close()
        return out

    cpu = logits((bos_bundle / "fp16.cpu.onnx").read_bytes(), "float32")
    cuda = logits((bos_bundle / "fp16.cuda.onnx").read_bytes(), "float16")
    assert np.isfinite(cuda).all()
    assert np.abs(cuda - cpu).max() <= 0.05 * np.abs(cpu).max()
    # the same graph with a float16 residual stream: what the fix avoids
    spec = open_model(bos_model).spec
    index = read_index(bos_bundle)
    g, _ = build_graph(spec, ["fp16"] * spec.num_layers, index, "float16", 64)
    assert not np.isfinite(logits(g.SerializeToString(), "float16")).all()


def test_the_default_measurement_scores_a_residual_past_float16s_range(bos_model, tmp_path,
                                                                        monkeypatch):
    """The default profile's streamed estimate keeps the FP16 model's hidden states to recompute
    each layer; a state past 65,504 stopped the build ("overflows float16") before it measured
    anything, on this model as on a real Gemma 3. It is now stored in float32: the estimate is
    the one a float32 store from the start gives, bit for bit, and the default-profile build
    ships."""
    from lsaq_compile import estimate as E
    from lsaq_compile.activations import activation_stats
    from lsaq_compile.bundle import build_bundle, read_manifest
    from lsaq_compile.model_source import open_model
    from lsaq_compile.progress import Progress
    from lsaq_compile.quantize import schemes_for

    src = open_model(bos_model)
    win = np.random.default_rng(0).integers(3, 500, size=(2, 24))
    win[:, 0] = BOS
    schemes = schemes_for("group", 32, False, 32, "mse-act")
    act = activation_stats(src, win)
    dtypes = []
    real = E._Hidden.put

    def put(self, i, sl, h):
        real(self, i, sl, h)
        dtypes.append(self.a.dtype)

    monkeypatch.setattr(E._Hidden, "put", put)
    got = E.estimate(src, win, schemes, act, probes=2, seed=0)
    assert set(dtypes) == {np.dtype(np.float32)}          # widened at the embedding (BOS)
    assert np.isfinite(got.first).all() and (got.first != 0).any()
    init = E._Hidden.__init__
    monkeypatch.setattr(E._Hidden, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "dtype": np.float32}))
    want = E.estimate(src, win, schemes, act, probes=2, seed=0)
    for name in ("first", "outdiag", "local", "out_sq"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    monkeypatch.undo()

    prof = small_profile(samples=2, seq_len=32)
    prof.scoring.measure = "fisher"
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 2, 0, 4
    scored = []
    score = E.score
    monkeypatch.setattr(E, "score", lambda *a, **k: (scored.append(1), score(*a, **k))[1])
    out = build_bundle(bos_model, tmp_path / "b", profile=prof, progress=Progress(quiet=True))
    m = read_manifest(out)
    assert scored and len(m["variants"]) >= 2
    assert all(np.isfinite(v["quality"]["kl_fp16"]) for v in m["variants"])


def test_a_gpu_build_computes_in_float32_where_float16_overflows(bos_model, tmp_path,
                                                                 monkeypatch):
    """On a GPU the passes compute in float16 by default, and this model's residual passes
    65,504 at BOS: the activation pass's statistics come out inf. The build then measures them
    again in float32 and every later pass (estimate, token tables, whole plans) computes in
    float32; the job records it. Simulated on the CPU: float16 wherever a GPU's default dtype
    would be, the device reported as cuda to the stage that decides."""
    from lsaq_compile import activations, devices
    from lsaq_compile import estimate as E
    from lsaq_compile.bundle import build_bundle, read_manifest
    from lsaq_compile.progress import Progress
    from lsaq_compile.stages import calibration

    real_dtype = devices._dtype
    monkeypatch.setattr(devices, "_dtype", lambda dev, dtype: torch.float16 if dtype is None
                        else real_dtype(dev, dtype))
    monkeypatch.setattr(calibration, "device_type", lambda device: "cuda")
    seen = {"activations": [], "score": [], "meter": []}
    act, score, meter = activations.activation_stats, E.score, E.StreamMeter.__init__
    monkeypatch.setattr(activations, "activation_stats", lambda *a, **k: (
        seen["activations"].append(k.get("dtype")), act(*a, **k))[1])
    monkeypatch.setattr(E, "score", lambda *a, **k: (seen["score"].append(k.get("dtype")),
                                                     score(*a, **k))[1])
    monkeypatch.setattr(E.StreamMeter, "__init__", lambda self, *a, **k: (
        seen["meter"].append(k.get("dtype")), meter(self, *a, **k))[1])
    said = []
    prog = Progress(quiet=True)
    monkeypatch.setattr(prog, "stage", lambda name: lambda msg: said.append(f"{name}: {msg}"))
    prof = small_profile(samples=2, seq_len=32)
    prof.scoring.measure = "fisher"
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 2, 0, 4
    out = build_bundle(bos_model, tmp_path / "b", profile=prof, progress=prog)
    assert seen == {"activations": [None, "float32"], "score": ["float32"], "meter": ["float32"]}
    assert any("pass float16's range" in m and m.startswith("activations") for m in said), said
    assert all(np.isfinite(v["quality"]["kl_fp16"]) for v in read_manifest(out)["variants"])



def test_the_runtime_never_loads_a_variant_a_finer_one_beats(bos_bundle):
    """Whatever the held-out numbers say, at every memory level the loaded variant is not
    dominated (at least as precise in every part) by another variant that fits; with room for
    everything it is FP16. On this model perplexity falls under some quantization noise (the
    broken-baseline effect), KL from FP16 does not."""
    from lsaq_compile.bundle import read_manifest
    from lsaq_runtime.planner import dominates, plan
    from lsaq_runtime.probe import Device, simulated

    m = read_manifest(bos_bundle)
    assert m["deployment"]["rank_by"] == "kl_fp16"
    big = Device("cpu", None, "sim", 2**40, 2**40, "test")
    d = plan(m, big)
    assert d.chosen == "fp16"
    by_name = {v["name"]: v for v in m["variants"]}
    for r in d.rows:
        got = plan(m, simulated(big, r.need_bytes), budget=r.need_bytes)
        chosen = by_name[got.chosen]
        fitting = [by_name[x.name] for x in got.rows if x.fits and x.name != got.chosen]
        assert not any(dominates(f, chosen) and f is not chosen and
                       not dominates(chosen, f) for f in fitting)


def _peak_rss(bundle, variant: str, context: int, prompt: str) -> int:
    """Peak resident set of one `lsaq-run` process that fills the context (bytes)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lsaq_runtime.cli", str(bundle), "-", "--device", "cpu",
           "--variant", variant, "--context", str(context), "--max-new-tokens", "4"]
    r = subprocess.run(cmd, input=prompt.encode(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env={**os.environ, "LSAQ_MEMORY_TRACE": "1"},
                       timeout=300)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    # the child's own high-water mark (VmHWM); the "end" line comes after generating
    ends = [line for line in err.splitlines() if line.startswith("lsaq-memory: end ")]
    assert ends, err
    return int(ends[-1].split("peak=")[1].split()[0])


def test_memory_plan_holds_on_a_large_vocabulary(tmp_path_factory):
    """A 262,144-token vocabulary: the tokenizer alone holds about 180 MiB, a quantized table
    the head prepacks stays mapped beside its packed copy, and an fp16 head's float32 copies
    double while the session is created. The planner's need (what it compares with free memory)
    is never below the measured peak of a process that fills the context."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress
    from lsaq_runtime import decide, load_manifest
    from lsaq_runtime.text import TextCodec

    root = tmp_path_factory.mktemp("large-vocab")
    src = make_large_vocab_model(root / "hf")
    prof = small_profile(samples=2, seq_len=32)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 1, 0, 1
    prof.quantization.clip = "none"   # memory does not depend on rounding; the search is slow
    bundle = build_bundle(src, root / "b", profile=prof, progress=Progress(quiet=True))
    m = load_manifest(bundle)
    assert m["model"]["vocab_size"] == 262_144
    codec = TextCodec(bundle, m)
    context = 256
    ids = codec.encode_text(WIKITEXT.read_text(encoding="utf-8")[:20_000])[:context - 8]
    prompt = codec.decode(ids)
    smallest = min(m["variants"], key=lambda v: v["weight_bytes"])["name"]
    assert any(v["tables"]["embed_tokens"] != "fp16" for v in m["variants"])
    for name in ("fp16", smallest):
        d = decide(bundle, context=context, device="cpu", variant=name, memory_budget="1TiB",
                   simulate=True, manifest=m)
        row = d.chosen_row
        peak = _peak_rss(bundle, name, context, prompt)
        assert peak <= row.need_bytes, (name, peak, row)
        assert row.need_bytes <= 1.6 * peak   # and not by counting everything twice
        # what grows with the vocabulary is in the plan: the tokenizer among the overhead
        assert row.overhead_bytes >= 12 * (bundle / "tokenizer" / "tokenizer.json").stat().st_size
