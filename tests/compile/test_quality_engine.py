"""Build-time quality streamed through torch (stream_quality.py) for models whose float32
graphs do not fit memory: the same numbers as the graph engine on the same bundle and windows,
from the bundle's stored weights (never the source's), chosen by build.quality_engine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import pytest

from factories.bundles import small_profile
from lsaq_compile.errors import LsaqError
from lsaq_compile.model_source import open_model
from lsaq_compile.stages import writer
from lsaq_compile.stream_quality import streamed_quality


def _build(hf: Path, out: Path, accuracy: int, engine: str = "graphs", monkeypatch=None,
           streamed_samples: int = 4):
    """A tiny ladder bundle (tables on the ladder: INT8/INT4 embedding and head on most
    rungs), its quality measured by `engine`; returns (bundle, the held-out windows)."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    seen = {}
    orig = writer.measure_quality

    def spy(root, m, windows, log):
        seen["windows"] = np.array(windows)
        return orig(root, m, windows, log)

    prof = small_profile(samples=3, seq_len=48)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 3, 1, 4
    prof.build.quality_engine = engine
    prof.build.streamed_quality_samples = streamed_samples
    prof.quantization.cpu_accuracy_level = accuracy
    writer.measure_quality = spy
    try:
        b = build_bundle(hf, out, profile=prof, progress=Progress(quiet=True))
    finally:
        writer.measure_quality = orig
    return b, seen.get("windows")


@pytest.fixture(scope="module")
def graph_bundles(tiny_llama_dir, tmp_path_factory):
    """The same model and profile built on the exact kernels (accuracy level 0: float
    activations) and on the default ones (level 4: int8 activations in MatMulNBits)."""
    tmp = tmp_path_factory.mktemp("quality-engine")
    return {acc: _build(tiny_llama_dir, tmp / f"acc{acc}", acc) for acc in (0, 4)}


def _compare(bundle: Path, windows, source) -> list[tuple[str, dict, dict]]:
    m = json.loads((bundle / "manifest.json").read_text())
    got = streamed_quality(bundle, windows, source, lambda s: None)
    return [(v["name"], v["quality"], got[v["name"]]) for v in m["variants"]]


def test_streamed_equals_the_graphs_on_the_exact_kernels(graph_bundles, tiny_llama_dir):
    """Float activations: both engines compute the stored weights in float32, so every
    variant's numbers agree to float32 rounding. A layer at a wrong precision or a table left
    unquantized moves KL by far more than this (the INT8 variants' KLs are about 1e-4)."""
    bundle, windows = graph_bundles[0]
    rows = _compare(bundle, windows, open_model(tiny_llama_dir))
    assert {name for name, _, _ in rows} >= {"fp16", "int8", "int4"}
    for name, g, s in rows:
        assert s["tokens"] == g["tokens"] == windows.shape[0] * (windows.shape[1] - 1)
        assert s["perplexity"] == pytest.approx(g["perplexity"], rel=2e-5), name
        assert s["kl_fp16"] == pytest.approx(g["kl_fp16"], rel=2e-3, abs=2e-6), name


def test_streamed_close_to_the_default_kernels_and_ranks_alike(graph_bundles, tiny_llama_dir):
    """Accuracy level 4 quantizes the activations of every quantized matmul to int8: the
    graphs' numbers carry that noise (about 5e-5 of KL on this model, measured: 1.3e-4 graphs
    vs 0.9e-4 streamed at INT8), the streamed pass does not. FP16 has no quantized matmul."""
    bundle, windows = graph_bundles[4]
    rows = _compare(bundle, windows, open_model(tiny_llama_dir))
    for name, g, s in rows:
        if name == "fp16":
            assert s["perplexity"] == pytest.approx(g["perplexity"], rel=2e-5)
            continue
        assert s["perplexity"] == pytest.approx(g["perplexity"], rel=3e-3), name
        assert abs(s["kl_fp16"] - g["kl_fp16"]) <= 1e-4 + 0.05 * g["kl_fp16"], name
    # the same order wherever the graphs' KLs are clearly apart (twice over)
    for _, g1, s1 in rows:
        for _, g2, s2 in rows:
            if g2["kl_fp16"] > 2 * g1["kl_fp16"] + 1e-4:
                assert s2["kl_fp16"] > s1["kl_fp16"]


class _LyingSource:
    """The model source with every decoder linear and token table changed (norms, biases and
    shapes left alone): a quality measured from it instead of the store moves."""

    def __init__(self, source):
        self._s = source
        self.linears_read = 0

    def __getattr__(self, name):
        return getattr(self._s, name)

    def layer_tensors(self, i, linears=True):
        self.linears_read += linears
        t = self._s.layer_tensors(i, linears)
        return {k: (v * 1.7 + 0.01 if k.endswith("proj.weight") else v) for k, v in t.items()}

    def tensor(self, name):
        v = self._s.tensor(name)
        return v[::-1].copy() if name.endswith(("embed_tokens.weight", "lm_head.weight")) else v

    def tensor_rows(self, name, a, b):
        return None      # read whole through tensor()

    def table_rows(self, name, a, b):
        return self.tensor(name)[a:b]   # the lying table

    def table_rows_count(self, name):
        return len(self.tensor(name))

    def table_rows_at(self, name, ids, as_stored=False):
        return self.tensor(name)[ids]


def test_streamed_reads_the_store_not_the_source(graph_bundles, tiny_llama_dir):
    """Run on a source whose linears and tables are not the model's: the numbers are the same
    to the last digit, so every matrix came from the bundle's weight store."""
    bundle, windows = graph_bundles[0]
    honest = _compare(bundle, windows, open_model(tiny_llama_dir))
    liar = _LyingSource(open_model(tiny_llama_dir))
    lying = _compare(bundle, windows, liar)
    assert [s for _, _, s in lying] == [s for _, _, s in honest]
    assert liar.linears_read == 0   # the source's linears are not even read (norms are)


def test_streamed_reads_each_variants_own_codes(graph_bundles, tiny_llama_dir, tmp_path):
    """Give the INT4 variant the INT8 variant's precisions and tables in a copy of the
    manifest: the streamed numbers follow to INT8's, so the stored codes read are those the
    manifest names per layer and table."""
    import shutil

    bundle, windows = graph_bundles[0]
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    v8 = next(v for v in m["variants"] if v["name"] == "int8")
    k = next(k for k, v in enumerate(m["variants"]) if v["name"] == "int4")
    was = m["variants"][k]["quality"]["kl_fp16"]
    m["variants"][k] = {**v8, "name": "int4", "rank": m["variants"][k]["rank"]}
    (copy / "manifest.json").write_text(json.dumps(m))
    got = streamed_quality(copy, windows, open_model(tiny_llama_dir), lambda s: None)
    assert got["int4"] == got["int8"] and got["int4"]["kl_fp16"] < was / 10


def test_auto_streams_where_the_graphs_do_not_fit(monkeypatch):
    import lsaq_runtime.probe

    said = []
    monkeypatch.setattr(lsaq_runtime.probe, "probe_host",
                        lambda: SimpleNamespace(free_bytes=24 << 30))
    assert writer.quality_engine("auto", 7_000_000_000, said.append) == "streamed"
    assert "39.1 GiB" in said[-1] and "24.0 GiB is available" in said[-1]
    assert writer.quality_engine("auto", 135_000_000, said.append) == "graphs"
    assert writer.quality_engine("graphs", 7_000_000_000, said.append) == "graphs"


def test_build_bundle_refuses_a_bad_profile_object_before_any_work(tmp_path):
    """A Profile passed to the API is validated like a TOML file, at build_bundle's entry:
    nothing is created."""
    from lsaq_compile.bundle import build_bundle

    prof = small_profile()
    prof.build.quality_engine = "fast"
    with pytest.raises(LsaqError, match="quality_engine must be 'auto', 'graphs' or 'streamed'"):
        build_bundle(tmp_path / "no-such-model", tmp_path / "out", profile=prof)
    assert not (tmp_path / "out").exists()


def test_auto_build_on_too_little_memory_says_streamed(tiny_llama_dir, tmp_path, monkeypatch,
                                                         graph_bundles):
    """A build whose machine reports too little memory for the graphs at the writer stage
    measures streamed, and its manifest says so; the numbers are the graphs' (exact kernels)."""
    import lsaq_runtime.probe

    from lsaq_compile import stages

    run = stages.writer.run

    def starved(job, ctx):       # only the writer sees the small machine (scoring checks too)
        monkeypatch.setattr(lsaq_runtime.probe, "probe_host",
                            lambda: SimpleNamespace(free_bytes=1 << 20))
        return run(job, ctx)

    monkeypatch.setattr(stages.writer, "run", starved)
    b, seen = _build(tiny_llama_dir, tmp_path / "b", 0, engine="auto")
    assert seen is None                                   # the graphs never ran
    m = json.loads((b / "manifest.json").read_text())
    q = m["deployment"]["quality"]
    assert q["engine"] == "torch-streamed" and "torch" in q["what"]
    ref = json.loads((graph_bundles[0][0] / "manifest.json").read_text())
    assert ref["deployment"]["quality"]["engine"] == "onnxruntime-cpu-graphs"
    want = {v["name"]: v["quality"] for v in ref["variants"]}
    for v in m["variants"]:
        assert v["quality"]["perplexity"] == pytest.approx(want[v["name"]]["perplexity"],
                                                           rel=2e-5)
    from lsaq_runtime.manifest import load_manifest

    load_manifest(b)                                      # the runtime reads it


def test_streamed_builds_measure_on_fewer_windows(tiny_llama_dir, tmp_path, graph_bundles):
    """build.streamed_quality_samples: a streamed build measures on the first N held-out
    windows (each costs every variant a pass of the whole model at 7B), the manifest's token
    counts say so, and the numbers are the streamed pass's on exactly those windows."""
    b, _ = _build(tiny_llama_dir, tmp_path / "b", 0, engine="streamed", streamed_samples=2)
    windows = graph_bundles[0][1]                 # the same model and profile: the same windows
    assert len(windows) == 4
    m = json.loads((b / "manifest.json").read_text())
    got = streamed_quality(b, windows[:2], open_model(tiny_llama_dir), lambda s: None)
    for v in m["variants"]:
        q = v["quality"]
        assert q["tokens"] == 2 * (windows.shape[1] - 1), v["name"]
        assert q["perplexity"] == pytest.approx(got[v["name"]]["perplexity"], rel=1e-6)
        assert q["kl_fp16"] == pytest.approx(got[v["name"]]["kl_fp16"], rel=1e-6, abs=1e-9)


def test_profile_refuses_an_unknown_engine(tmp_path):
    from lsaq_compile.profiles import load_profile

    p = tmp_path / "p.toml"
    p.write_text("[build]\nquality_engine = 'fast'\n")
    with pytest.raises(LsaqError, match="quality_engine must be 'auto', 'graphs' or 'streamed'"):
        load_profile(str(p))
    p.write_text("[build]\nquality_engine = 'streamed'\n")
    assert load_profile(str(p)).build.quality_engine == "streamed"


@pytest.mark.parametrize("family", ["phi3", "gemma3", "qwen2"])
def test_streamed_equals_the_graphs_in_every_family_shape(family, tmp_path):
    """Fused checkpoints (Phi-3, longrope past 16 positions), a tied soft-capped head with a
    scaled embedding and sliding windows (Gemma 3), q/k/v biases (Qwen2): on the exact kernels
    the streamed numbers are the graphs' on the same windows."""
    from factories.bundles import family_bundle

    b = family_bundle(tmp_path, family)
    m = json.loads((b / "manifest.json").read_text())
    w = np.random.default_rng(0).integers(3, m["model"]["vocab_size"], (2, 24))
    g = writer.measure_quality(b, m, w, lambda s: None)
    s = streamed_quality(b, w, open_model(tmp_path / f"hf-{family}"), lambda s: None)
    for name in g:
        assert s[name]["perplexity"] == pytest.approx(g[name]["perplexity"], rel=2e-5), name
        assert s[name]["kl_fp16"] == pytest.approx(g[name]["kl_fp16"], rel=2e-3, abs=2e-6), name


def test_streamed_equals_the_graphs_with_tied_quantized_tables(ladder_bundles):
    """A tied model with its one table on the ladder (the head computes with the embedding's
    INT8/INT4 codes) and the fp16-table rung's CPU head on the INT8 table (cpu_lm_head int8)."""
    b = ladder_bundles["tied"]
    m = json.loads((b / "manifest.json").read_text())
    assert {v["tables"]["embed_tokens"] for v in m["variants"]} >= {"int8", "int4"}
    assert any(v["tables"]["lm_head"] == "fp16" and v["providers"]["cpu"]["lm_head"] == "int8"
               for v in m["variants"])
    w = np.random.default_rng(1).integers(3, m["model"]["vocab_size"], (2, 24))
    g = writer.measure_quality(b, m, w, lambda s: None)
    s = streamed_quality(b, w, open_model(b.parent / "hf-qwen3"), lambda s: None)
    for name in g:
        assert s[name]["perplexity"] == pytest.approx(g[name]["perplexity"], rel=2e-5), name
        assert s[name]["kl_fp16"] == pytest.approx(g[name]["kl_fp16"], rel=2e-3, abs=2e-6), name


def test_cli_sets_the_engine(capsys, monkeypatch, tmp_path):
    """build --quality-engine overrides the profile's setting; an unknown engine is refused."""
    from factories.cli import run_cli

    import lsaq_compile.bundle

    seen = {}

    def fake_build(model, out, profile, **kw):
        seen["engine"] = profile.build.quality_engine
        raise LsaqError("stop here")

    monkeypatch.setattr(lsaq_compile.bundle, "build_bundle", fake_build)
    code, _, err = run_cli(capsys, "compile", ["build", "-o", tmp_path / "b",
                                               "--quality-engine", "streamed"])
    assert seen == {"engine": "streamed"} and code != 0 and "stop here" in err
    code, _, err = run_cli(capsys, "compile", ["build", "-o", tmp_path / "b",
                                               "--quality-engine", "fast"])
    assert code == 2 and "fast" in err


@pytest.mark.parametrize("bits,k", [(4, 96), (4, 100), (8, 96), (8, 72)])
def test_stored_weights_dequantize_in_torch_bit_identical(bits, k):
    """The streamed pass dequantizes the stored codes in torch (numpy's single thread was most
    of a 7B variant's time): the very floats Quantized.dequantize gives, padded K included."""
    from lsaq_compile.bundle_reader import Quantized
    from lsaq_compile.stream_quality import _dequantized

    rng = np.random.default_rng(bits + k)
    n, block = 6, 32
    nb = -(-k // block)
    q = Quantized(None, n, k, rng.integers(0, 2 ** bits, (n, nb * block), dtype=np.uint8),
                  (rng.random((n, nb)) * 0.01 + 1e-4).astype(np.float16),
                  rng.integers(0, 2 ** bits, (n, nb), dtype=np.uint8))
    got = _dequantized(q)
    assert got.is_contiguous() and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), q.dequantize())


def test_build_time_quality_keeps_its_reference_in_the_build_folder(tiny_bundle, tmp_path,
                                                                     monkeypatch):
    """The FP16 reference distributions (gigabytes at a large vocabulary) go to the build's job
    folder: a build killed there (SIGKILL, out of memory) leaves them where the next build
    cleans up or --resume drops them, not in the system's temporary folder."""
    import shutil

    from lsaq_compile.job import JOB_DIR

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    (b / JOB_DIR).mkdir()
    m = json.loads((b / "manifest.json").read_text())
    w = np.random.default_rng(0).integers(3, m["model"]["vocab_size"], (1, 16))
    made = []
    memmap = np.lib.format.open_memmap
    monkeypatch.setattr(np.lib.format, "open_memmap",
                        lambda path, *a, **k: made.append(Path(path)) or memmap(path, *a, **k))
    got = writer.measure_quality(b, m, w, lambda s: None)
    assert set(got) == {v["name"] for v in m["variants"]}
    assert len(made) == 1 and made[0].parent.parent == b / JOB_DIR
    assert not list((b / JOB_DIR).iterdir())          # removed once measured
