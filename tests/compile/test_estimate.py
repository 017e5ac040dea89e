"""The streamed sensitivity estimate (lsaq_compile.estimate) against the exact measurement."""

import time
import weakref

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from factories.models import make_tiny_family, make_tiny_model
from lsaq_compile import estimate as E
from lsaq_compile import sensitivity
from lsaq_compile.activations import activation_stats
from lsaq_compile.errors import LsaqError
from lsaq_compile.model_source import open_model
from lsaq_compile.quantize import schemes_for

SCHEMES = schemes_for("group", 32, False, 32, "mse-act")   # the default profile's quantizers
# The streamed pass and KLMeter compute the logits with differently shaped float32 matmuls, and
# a KL of 1e-5 a token is a small difference of large sums: they agreed to 1e-8 on a CPU with
# AVX-512 and to 4.3e-8 on an AVX2-only one (KL 7.1e-6, lm_head int8). A wrong plan or
# precision is off by far more (the tables' INT8 and INT4 KLs differ 10-100x).
KL_ATOL = 1e-7
LINEAR = sensitivity.GRANULARITY["linear"]


def _flat(cost) -> np.ndarray:
    return np.array([cost[u][i][q] for u in cost for i in range(len(cost[u]))
                     for q in sensitivity.QUANTIZED])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, calibration windows, its activation statistics and the exact costs."""
    src = open_model(make_tiny_model(tmp_path_factory.mktemp("est") / "llama"))
    win = np.random.default_rng(0).integers(3, 512, size=(4, 32))
    act = activation_stats(src, win)
    meter = sensitivity.KLMeter(src, win, SCHEMES, act)
    exact = sensitivity.measure(meter, units=LINEAR)
    return src, win, act, meter, exact


@pytest.fixture(scope="module")
def est16(tiny):
    src, win, act, _, _ = tiny
    return E.estimate(src, win, SCHEMES, act, probes=16, seed=0)


def test_estimate_tracks_exact_kl_in_rank_and_scale(tiny, est16):
    exact = _flat(tiny[4].cost)
    fisher = _flat(est16.cost("fisher"))
    assert spearmanr(exact, fisher)[0] > 0.95
    # a second-order estimate, not a fitted one: the scale itself must come out
    assert 0.7 < np.median(fisher / exact) < 1.4
    # the cheap local error alone ranks worse (it knows nothing downstream of a linear)
    assert spearmanr(exact, fisher)[0] > spearmanr(exact, _flat(est16.cost("local")))[0]


def test_estimate_returns_what_the_knapsack_consumes(tiny, est16):
    src, _, _, meter, exact = tiny
    sens = est16.sensitivity("fisher", LINEAR)
    assert sens.units == exact.units and sens.tokens == exact.tokens
    sensitivity.check_finite(sens)
    plans, kl, _ = sensitivity.ladder_plans(meter, sens, SCHEMES, "bytes", rungs=2, refine=0)
    assert [p.name for p in plans][:2] == ["fp16", "int8"] and plans[-1].name == "int4"
    # block units: a half's first-order terms add before squaring (the cross term counts)
    block = est16.cost("fisher", sensitivity.GRANULARITY["block"])
    i = 1
    a = est16.first[:, :, i, :2].sum(axis=2)[..., 1]
    assert block["attn"][i]["int4"] == pytest.approx(0.5 * (a ** 2).sum(1).mean() / est16.tokens)


def test_estimate_is_deterministic_and_probes_nest(tiny, est16):
    src, win, act, _, _ = tiny
    four = E.estimate(src, win, SCHEMES, act, probes=4, seed=0)
    np.testing.assert_array_equal(four.first, est16.first[:4])   # a larger run extends a smaller
    np.testing.assert_array_equal(four.local, est16.local)
    other = E.estimate(src, win, SCHEMES, act, probes=4, seed=1)
    assert not np.allclose(other.first, four.first)
    np.testing.assert_array_equal(other.local, four.local)        # no probe in the local error
    # windows one at a time (the x of every window from a separate no-grad pass): same terms
    single = E.estimate(src, win, SCHEMES, act, probes=4, seed=0, batch_size=1)
    np.testing.assert_allclose(single.first, four.first, rtol=1e-4, atol=1e-9)
    only = E.estimate(src, win, SCHEMES, act, probes=0)           # one forward sweep
    np.testing.assert_allclose(only.local, four.local, rtol=1e-4)
    assert not only.first.size


def test_estimate_in_the_cuda_dtypes_agrees_with_float32(tiny):
    """The GPU's compute dtypes, run on the CPU: same labels, same ranking, close scale."""
    src, win, act, _, _ = tiny
    f32 = _flat(E.estimate(src, win, SCHEMES, act, probes=4, seed=0).cost())
    for dtype, tol in (("bfloat16", 0.15), ("float16", 0.02)):
        low = _flat(E.estimate(src, win, SCHEMES, act, probes=4, seed=0, dtype=dtype).cost())
        assert spearmanr(f32, low)[0] > 0.99
        assert np.median(np.abs(np.log(low / f32))) < tol


def test_estimate_holds_one_layer_and_memory_maps_hidden_states(tiny, est16, monkeypatch,
                                                                 tmp_path):
    src, win, act, _, _ = tiny
    alive, peak = set(), [0]
    build = E._Stack.layer

    def layer(self, i):
        mod = build(self, i)
        alive.add(id(mod))
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(mod, alive.discard, id(mod))
        return mod

    monkeypatch.setattr(E._Stack, "layer", layer)
    monkeypatch.setattr(E, "MEMMAP_BYTES", 0)          # every hidden state goes to a file
    seen = []
    real = E._Hidden.__init__

    def hidden(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.path)

    monkeypatch.setattr(E._Hidden, "__init__", hidden)
    est = E.estimate(src, win, SCHEMES, act, probes=2, seed=0, workdir=tmp_path)
    assert peak[0] == 1                                # never two decoder layers at once
    assert seen and seen[0].parent == tmp_path and not seen[0].exists()   # removed after
    np.testing.assert_allclose(est.first, est16.first[:2], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("where", ["ram", "file", "checkpoint"])
def test_hidden_states_widen_to_float32_past_float16s_range(where, tmp_path, monkeypatch):
    """States are float16 until one passes 65,504; the store then holds float32, the states
    already written keep their float16 values exactly, the float16 file is gone, and a
    checkpoint records the dtype so a resumed run reads the float32 file. NaN is refused."""
    import torch

    if where != "ram":
        monkeypatch.setattr(E, "MEMMAP_BYTES", 0)
    shape, L = (2, 3, 4), 3
    states = [torch.full(shape, 1.0 / 3 + i) for i in range(L + 1)]
    states[2][1, 2, 3] = 1.0e5                                  # past float16 (Gemma at BOS)
    ck = E.Checkpoint(tmp_path / "ck", "key") if where == "checkpoint" else None
    h = ck.hidden(L, shape) if ck else E._Hidden(L, shape, tmp_path)
    for i in range(2):
        h.put(i, slice(None), states[i])
    assert h.a.dtype == np.float16
    first = h.path or h.kept
    h.put(2, slice(None), states[2])
    h.put(3, slice(None), states[3])
    assert h.a.dtype == np.float32
    for i in range(2):
        np.testing.assert_array_equal(h.get(i, slice(None)), states[i].half().float().numpy())
    for i in (2, 3):
        np.testing.assert_array_equal(h.get(i, slice(None)), states[i].numpy())
    if where == "ram":
        assert first is None and h.path is None
    else:
        assert first.suffix == ".f16" and not first.exists()
        assert (h.path or h.kept).suffix == ".f32" and (h.path or h.kept).exists()
    h.finish()
    if ck:
        again = ck.hidden(L, shape)                          # a resumed run: complete, float32
        assert again.complete and again.a.dtype == np.float32
        np.testing.assert_array_equal(again.get(2, slice(None)), states[2].numpy())
        ck.clear()
        assert not list((tmp_path / "ck").iterdir())
    else:
        path = h.path
        h.close()
        assert path is None or not path.exists()
    nan = E._Hidden(L, shape, tmp_path)
    with pytest.raises(LsaqError, match="layer 0 is not finite"):
        nan.put(0, slice(None), torch.full(shape, float("nan")))


def test_progress_reports_stage_layer_rate_and_eta(tiny):
    src, win, act, _, _ = tiny
    steps = []
    E.estimate(src, win, SCHEMES, act, probes=2, progress=steps.append)
    L = src.spec.num_layers
    assert [(s.stage, s.done) for s in steps] == \
        [("forward", i) for i in range(1, L + 1)] + [("backward", i) for i in range(1, L + 1)]
    assert all(s.rate > 0 and s.eta >= 0 and s.total == L for s in steps)
    assert steps[-1].eta == 0 and "layer 4/4" in str(steps[-1])
    # a whole-plan pass says how many plans it measures: the first pass of a ladder (its rungs)
    # and each refinement pass (their swaps) are otherwise the same lines in an hour-long log
    passes = []
    meter = E.StreamMeter(src, win, SCHEMES, act, progress=passes.append)
    meter.kl_many([("int4",) * L, ("int8",) * L])
    assert {s.stage for s in passes} == {"2 plans"} and passes[-1].done == L


def test_progress_on_a_gpu_times_its_work_not_its_queueing(monkeypatch, tmp_path):
    """CUDA kernels run after their launch returns: a clock read without waiting for them
    reports the queueing as a layer's time. Simulated: a synchronize that takes 0.2 s."""
    waited = []

    def synchronize(dev):
        waited.append(str(dev))
        time.sleep(0.2)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    steps = []
    t0 = time.perf_counter()
    E._Clock(4, 0, steps.append, torch.device("cuda:0")).tick("local", 1, t0)
    assert waited == ["cuda:0"] and steps[0].elapsed >= 0.2 and steps[0].rate <= 5
    E._Clock(4, 0, steps.append).tick("local", 1, time.perf_counter())   # the CPU: no wait
    assert waited == ["cuda:0"] and steps[1].elapsed < 0.2
    # the activation pass's layer timings wait too, before each progress line
    from lsaq_compile import layerwise
    order = []
    monkeypatch.setattr(layerwise, "synchronize", lambda dev: order.append("sync"))
    src = open_model(make_tiny_model(tmp_path / "m", num_hidden_layers=2))
    layerwise.forward_layers(src, np.ones((1, 8), np.int64),
                             progress=lambda i, n, s: order.append("progress"))
    assert order == ["sync", "progress"] * src.spec.num_layers


def test_plans_kl_is_the_exact_whole_plan_kl_in_one_pass(tiny):
    src, win, act, meter, _ = tiny
    plans = [("int4",) * 4, ("int8",) * 4, ("fp16", "int4", "int8/int4/int4/int8", "int8")]
    got = E.plans_kl(src, win, SCHEMES, plans, act)
    want = [meter.kl(p) for p in plans]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=KL_ATOL)
    # float16, the CUDA default, holds the FP16 weights exactly: the whole-plan KLs stay close
    half = E.plans_kl(src, win, SCHEMES, plans, act, dtype="float16")
    np.testing.assert_allclose(half, want, rtol=0.05)


def test_whole_plan_logits_are_float32_in_any_compute_dtype(tiny, monkeypatch):
    """A GPU computes the layers in float16, but the whole-plan KLs are differences of large
    logit sums: float16 logits (rounded by up to 8e-3 at |z| of 16-32) moved a 3e-7 KL to 4e-6
    in a 32k-vocabulary simulation. The head is walked in float32 whatever the compute dtype;
    run here in float16 on the CPU, the KLs stay close to float32's."""
    src, win, act, _, _ = tiny
    plans = [(("int4",) * 4, {"embed_tokens": "int8"}), (("int8",) * 4, {})]
    chunks, sums = [], []
    real_chunks, real_sums = E._Stack.head_chunks, E.head_sums

    def head_chunks(self, dtype=None, precision="fp16"):
        chunks.append(dtype)
        return real_chunks(self, dtype, precision)

    def head_sums(st, x, *a, **k):
        sums.extend(v.dtype for v in x.values())
        return real_sums(st, x, *a, **k)

    monkeypatch.setattr(E._Stack, "head_chunks", head_chunks)
    monkeypatch.setattr(E, "head_sums", head_sums)
    f32 = E.plans_kl(src, win, SCHEMES, plans, act_stats=act)
    f16 = E.plans_kl(src, win, SCHEMES, plans, act_stats=act, dtype="float16")
    assert chunks and set(chunks) == {torch.float32} and set(sums) == {torch.float32}
    np.testing.assert_allclose(f16, f32, rtol=5e-2)   # the layers in float16: 2% here


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_families_fused_linears_windows_and_softcapping(family, tmp_path):
    """Phi-3's fused qkv/gate_up and sliding windows, Gemma 3's scaled embeddings, sandwich
    norms and soft-capped logits: the streamed pass computes what KLMeter computes."""
    src = open_model(make_tiny_family(tmp_path / family, family))
    win = np.random.default_rng(1).integers(3, 512, size=(2, 24))
    schemes = schemes_for("group", 32, False, 32, "mse")
    meter = sensitivity.KLMeter(src, win, schemes)
    plan = tuple(["int4", "int8/int4/int8/int4"] + ["int8"] * (src.spec.num_layers - 2))
    np.testing.assert_allclose(E.plans_kl(src, win, schemes, [plan]), [meter.kl(plan)],
                               rtol=1e-4)
    exact = _flat(sensitivity.measure(meter, units=LINEAR).cost)
    est = _flat(E.estimate(src, win, schemes, probes=8).cost())
    assert spearmanr(exact, est)[0] > 0.9


def test_bad_arguments(tiny):
    src, win, act, _, _ = tiny
    with pytest.raises(LsaqError, match="probes"):
        E.estimate(src, win, SCHEMES, act, probes=-1)
    with pytest.raises(LsaqError, match="device"):
        E.estimate(src, win, SCHEMES, act, device="tpu")
    with pytest.raises(LsaqError, match="dtype"):
        E.estimate(src, win, SCHEMES, act, dtype="int8")
    with pytest.raises(LsaqError, match="precisions for"):
        E.plans_kl(src, win, SCHEMES, [("int8",)], act)


def test_batched_refinement_chooses_what_the_serial_one_chooses(tiny, est16):
    """allocate_rungs with each round's whole-plan KLs in one batch (one streamed pass)."""
    src, win, act, meter, _ = tiny
    sens = est16.sensitivity("fisher", LINEAR)
    sizes = sensitivity.layer_part_sizes(src.spec, SCHEMES, sens.units)
    lo = sum(sizes[i][u]["int4"] for i in range(len(sizes)) for u in sens.units)
    hi = sum(sizes[i][u]["int8"] for i in range(len(sizes)) for u in sens.units)
    budgets = [(f"r{k}", lo + (hi - lo) * k // 4) for k in range(5)]
    calls = []

    def kl_many(plans):
        calls.append(len(plans))
        return [meter.kl(p, t) for p, t in plans]

    got = E.allocate_rungs(sens, sizes, budgets, kl_many, refine=2)
    want = sensitivity.allocate_rungs(meter, sens, sizes, budgets, refine=2)
    assert [(r.plan.precisions, r.measured, r.refined) for r in got] == \
        [(r.plan.precisions, r.measured, r.refined) for r in want]
    assert len(calls) <= 3 and calls[0] == len(budgets)
    streamed = E.plans_kl(src, win, SCHEMES, [r.plan.precisions for r in got], act)
    np.testing.assert_allclose(streamed, [r.measured for r in got], rtol=1e-4, atol=KL_ATOL)


def test_build_bundle_takes_the_estimated_scores(tiny_llama_dir, tmp_path):
    """The hook the pipeline will use: Scores from the estimate, a ladder by bytes from them."""
    from factories.bundles import small_profile
    from lsaq_compile.bundle import build_bundle, read_manifest
    from lsaq_compile.calibration import load_calibration, load_tokenizer
    from lsaq_compile.progress import Progress

    prof = small_profile(samples=2, seq_len=32)
    prof.build.providers, prof.build.quality_samples, prof.build.rungs = ["cpu"], 0, 2
    src = open_model(tiny_llama_dir)
    calib = load_calibration(prof.scoring.calibration or None, load_tokenizer(src), samples=2,
                             seq_len=32)
    q = prof.quantization
    schemes = schemes_for(q.scheme, q.group_size, q.symmetric, q.block_size, q.clip)
    act = activation_stats(src, calib.windows)
    sc = E.score(src, calib, calib.windows, schemes, act, probes=2, tables=True)
    assert sc.params["measure"] == "fisher" and sc.params["probes"] == 2
    m = read_manifest(build_bundle(tiny_llama_dir, tmp_path / "b", profile=prof, scores=sc,
                                   progress=Progress(quiet=True)))
    assert m["scores"]["params"]["measure"] == "fisher"
    names = [v["name"] for v in m["variants"]]
    assert names[0] == "fp16" and "int8" in names and names[-1] == "int4"
    assert set(m["scores"]["params"]["tables"]) == {"embed_tokens", "lm_head"}


def test_plans_kl_with_token_tables_is_the_exact_kl(tiny):
    """Quantized embedding (every layer's input changes) and untied head, alone and with
    quantized layers: the streamed pass gives KLMeter.kl(precisions, tables)."""
    src, win, act, meter, _ = tiny
    L = src.spec.num_layers
    plans = [(("fp16",) * L, {"embed_tokens": "int4"}), (("fp16",) * L, {"lm_head": "int8"}),
             (("int8",) * L, {"embed_tokens": "int8", "lm_head": "int4"}),
             (("int4", "fp16", "int8/int4/int8/int8", "int8"), {"lm_head": "int4"})]
    got = E.plans_kl(src, win, SCHEMES, plans, act)
    want = [meter.kl(p, t) for p, t in plans]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=KL_ATOL)
    assert all(w > 0 for w in want)


def _whole_tables(source):
    """The source opened again, without row-range reads: it then holds each token table whole."""
    s = open_model(source.path)
    s.tensor_rows = lambda name, a, b: None
    s.tensor_shape = lambda name: None
    return s


def test_token_tables_are_read_by_row_ranges_never_held_whole(tiny):
    """A safetensors source reads a table's rows a range at a time (Llama 3's two 128k-row
    tables held whole as float16 were 2 GB of an 8B build's peak): the same KLs, bit for bit,
    as from a source holding the tables whole, and nothing of a table kept."""
    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    plans = [(("int8",) * L, {"embed_tokens": "int8", "lm_head": "int4"}),
             (("fp16",) * L, {"embed_tokens": "int4"})]
    dev = E._device("cpu")
    held = _whole_tables(src)
    rows = E._Stack(src, win, dev, E._dtype(dev, None), SCHEMES)
    whole = E._Stack(held, win, dev, E._dtype(dev, None), SCHEMES)
    assert E.plans_kl(src, win, SCHEMES, plans, act, stack=rows) == \
        E.plans_kl(src, win, SCHEMES, plans, act, stack=whole)
    assert src._tables16() == {} and set(held._tables16()) == {E.EMBED, E.LM_HEAD}
    assert rows.vocab == whole.vocab == src.spec.vocab_size


def test_tied_table_cost_is_the_exact_one(tmp_path):
    """A tied model's one table is the embedding and the head at once: its cost is measured
    exactly, as sensitivity.measure measures it."""
    src = open_model(make_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    win = np.random.default_rng(2).integers(3, 512, size=(2, 24))
    meter = sensitivity.KLMeter(src, win, SCHEMES_MSE)
    exact = sensitivity.measure(meter, units=LINEAR, tables=True)
    got = E.table_costs(src, win, SCHEMES_MSE, sensitivity.table_units(src.spec, src))
    assert set(got) == {"embed_tokens"}
    for p in sensitivity.QUANTIZED:
        assert got["embed_tokens"][p] == pytest.approx(exact.tables["embed_tokens"][p], rel=1e-3,
                                                       abs=1e-7)


SCHEMES_MSE = schemes_for("group", 32, False, 32, "mse")


@pytest.mark.parametrize("kind,symmetric", [("group", False), ("group", True), ("channel", True)])
def test_torch_dequantize_is_bit_identical_to_numpy(kind, symmetric):
    """The whole-plan pass dequantizes in torch (multi-threaded); it must compute exactly the
    weights the numpy reference (and so the graphs) compute with, padding and zero points too."""
    from lsaq_compile.quantize import quantize
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((24, 200)) * rng.uniform(0.01, 3, (24, 1))).astype(np.float32)
    schemes = schemes_for(kind, 32 if kind == "group" else None, symmetric, 32, "none")
    for prec in ("int8", "int4"):
        qt = quantize(w, schemes[prec])
        want = qt.dequantize()
        got = E._dequantized(qt).numpy()
        assert got.shape == want.shape == w.shape
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_torch_casts_are_numpys_bit_for_bit():
    """float16 <-> float32 casts go through torch (numpy's are one element at a time): they
    must give numpy's bits, at the edges too: ties to even, subnormals, past float16's range,
    signed zeros and infinities."""
    from lsaq_compile.devices import contiguous, to_float16, to_float32

    rng = np.random.default_rng(5)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, -70000.0, 1e-8, 2.0 ** -24,
                      2.0 ** -25, 3 * 2.0 ** -26, 5.960464477539063e-08, 6.1e-05, 1.0 + 2.0 ** -11,
                      1.0 + 3 * 2.0 ** -11, np.inf, -np.inf, 1e38], np.float32)
    wide = (rng.standard_normal(1 << 16) * np.exp(rng.uniform(-30, 15, 1 << 16))).astype(np.float32)
    bits = rng.integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([edges, wide, bits[np.isfinite(bits)]])
    with np.errstate(over="ignore"):   # past 65520: infinity, both ways
        np.testing.assert_array_equal(to_float16(x).view(np.uint16), x.astype(np.float16).view(np.uint16))
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[~np.isnan(h)]                                  # every float16 there is, NaN aside
    np.testing.assert_array_equal(to_float32(h).view(np.uint32), h.astype(np.float32).view(np.uint32))
    assert to_float32(x) is x and to_float16(h) is h     # nothing to convert: no copy
    w = rng.standard_normal((37, 53)).astype(np.float16)
    t = contiguous(w.T)
    assert t.flags["C_CONTIGUOUS"] and np.array_equal(t, np.ascontiguousarray(w.T))


def test_embedded_rows_quantized_alone_are_the_whole_tables_rows(tiny):
    """embedded() quantizes only the windows' rows of a token table: a table is quantized by
    rows, so they must equal the rows of the whole quantized table (what the graph holds)."""
    from lsaq_compile.export_onnx import EMBED, table_weight
    src, win, _, _, _ = tiny
    st = E._Stack(src, win, E._device("cpu"), E._dtype(E._device("cpu"), None), SCHEMES)
    whole = np.asarray(src.tensor(EMBED), np.float32)
    for prec in ("int8", "int4"):
        want = table_weight(whole, prec, SCHEMES)[win]
        np.testing.assert_array_equal(st.embedded(prec).numpy(), E._scale_embedded(
            src.spec, E.torch.from_numpy(want)).numpy())


def test_a_pass_over_kept_candidates_holds_no_source_linears(tiny, tmp_path, monkeypatch):
    """Once a layer's candidates are kept on disk, a whole-plan pass does not hold the source's
    float32 linears beside the layer (a fourth copy of it: 0.9 GB at 8B) nor read them again;
    the KLs are the same as the pass that made the candidates."""
    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    plans = [("int4",) * L, ("int8",) * L]
    m = E.StreamMeter(src, win, SCHEMES, act, candidates=tmp_path / "cand")
    first = m.kl_many(plans)
    assert m.stack._linears[1]                      # making candidates: the layer's linears held
    # a second meter over the same kept candidates (the first one would start from its kept
    # states and read no layer at all)
    m = E.StreamMeter(src, win, SCHEMES, act, candidates=tmp_path / "cand")
    monkeypatch.setattr(m.stack, "weight", lambda *a: pytest.fail(f"source linear read: {a}"))
    again = m.kl_many(plans)
    assert m.stack._linears == (L - 1, {})
    np.testing.assert_array_equal(again, first)


def test_later_passes_start_from_the_first_passs_kept_states(tiny, tmp_path, monkeypatch):
    """A refinement round's plans are a rung's plan with two parts swapped: they start from
    the rung's state kept by the first pass below the first part swapped, and the FP16
    reference is not run again. The KLs are the very ones of a pass that keeps nothing, and
    only the first pass's states are kept (a 70B's every round would be tens of GB)."""
    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    rungs = [(("int8",) * L, {}), (("int4", "int8", "int8", "int4"), {"lm_head": "int8"}),
             (("int4",) * L, {"embed_tokens": "int4"})]
    swaps = [(("int8", "int8", "int8/int4/int8/int8", "int8"), {}),        # from layer 2
             (("int4", "int8", "int4", "int8"), {"lm_head": "int8"}),       # from layer 2
             (("int4", "int4", "int4", "int8/int4/int4/int4"), {"embed_tokens": "int4"})]
    plain = E.plans_kl(src, win, SCHEMES, rungs + swaps, act)
    m = E.StreamMeter(src, win, SCHEMES, act, states=tmp_path / "states")
    np.testing.assert_array_equal(m.kl_many(rungs), plain[:3])
    kept = sorted(p.name for p in (tmp_path / "states").glob("*.pt"))
    assert len(kept) == 4 * L                # the reference and 3 rungs, every layer
    read, run = [], []
    layer, run_layer = m.stack.layer, m.stack.run
    monkeypatch.setattr(m.stack, "layer", lambda i: read.append(i) or layer(i))
    monkeypatch.setattr(m.stack, "run", lambda lay, i, h: run.append(i) or run_layer(lay, i, h))
    np.testing.assert_array_equal(m.kl_many(swaps), plain[3:])
    assert read == [2, 3]                    # layers 0-1 of every swap are its rung's
    assert sorted(run) == [2, 2, 3, 3, 3]    # no reference; swaps 1-2 share nothing past 1
    assert sorted(p.name for p in (tmp_path / "states").glob("*.pt")) == kept
    # every state kept: the first pass of a resumed build reads no layer, the same KLs
    read.clear()
    again = E.StreamMeter(src, win, SCHEMES, act, states=tmp_path / "states")
    monkeypatch.setattr(again.stack, "layer", lambda i: pytest.fail(f"layer {i} read"))
    np.testing.assert_array_equal(again.kl_many(rungs), plain[:3])
    again.close()
    assert not (tmp_path / "states").exists()
    # a state cut short by a kill (its .part file) is not a state
    m2 = E.StreamMeter(src, win, SCHEMES, act, states=tmp_path / "s2")
    (tmp_path / "s2" / ".000.0123.pt.part").write_bytes(b"cut")
    np.testing.assert_array_equal(m2.kl_many(rungs[:1]), plain[:1])


def test_the_token_tables_pass_keeps_the_reference_for_the_plans(tiny, tmp_path, monkeypatch):
    """The scoring stage's token-table pass carries the FP16 reference through every layer;
    it keeps those states (and only those: its quantized-embedding states are no rung's), so
    the plans' first pass does not run the reference again. Same KLs."""
    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    rungs = [("int8",) * L, ("int4", "int8", "int8", "int4")]
    plain = E.plans_kl(src, win, SCHEMES, rungs, act)
    folder = tmp_path / "states"
    E.table_costs(src, win, SCHEMES, ["embed_tokens"], act_stats=act,
                  kept=E.PlanStates(folder, keep=lambda e, prefix: e == "fp16"))
    assert len(list(folder.glob("*.pt"))) == L
    m = E.StreamMeter(src, win, SCHEMES, act, states=folder)
    run, run_layer = [], m.stack.run
    monkeypatch.setattr(m.stack, "run", lambda lay, i, h: run.append(i) or run_layer(lay, i, h))
    np.testing.assert_array_equal(m.kl_many(rungs), plain)
    assert len(run) == 2 * L                 # the two rungs, every layer; no reference (3 * L)


def test_a_fisher_build_keeps_plan_states_only_while_planning(tiny_llama_dir, tmp_path,
                                                               monkeypatch):
    """The job folder's plan-states are written by the scoring and plan stages and removed once
    the plans are chosen (a killed build keeps them for --resume)."""
    from factories.bundles import small_profile
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.stages import plan as plan_stage

    seen = {}
    real = plan_stage._ladder

    def spy(ctx, meter, sens, kind):
        seen["during"] = sorted(p.name for p in meter.states.folder.glob("*.pt"))
        seen["folder"] = meter.states.folder
        return real(ctx, meter, sens, kind)

    monkeypatch.setattr(plan_stage, "_ladder", spy)
    from lsaq_compile.progress import Progress

    prof = small_profile(samples=2, seq_len=32, measure="fisher", probes=2)
    prof.build.providers, prof.build.quality_samples, prof.build.rungs = ["cpu"], 0, 2
    build_bundle(tiny_llama_dir, tmp_path / "b", profile=prof, progress=Progress(quiet=True))
    L = open_model(tiny_llama_dir).spec.num_layers
    assert len(seen["during"]) >= L          # at least the reference, kept by the tables pass
    assert seen["folder"].name == "plan-states" and not seen["folder"].exists()


def test_a_bfloat16_checkpoints_table_rows_are_the_tables_rows(tmp_path):
    """A bfloat16 checkpoint's rows are read alone where numpy knows bfloat16 (ml_dtypes,
    which onnx brings) and the table is read whole through torch where it does not: the stack
    gives the same rows either way."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = make_tiny_model(tmp_path / "bf16")
    for f in folder.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(f),
                  metadata={"format": "pt"})
    src = open_model(folder)
    whole = src.tensor(E.EMBED)
    rows = src.tensor_rows(E.EMBED, 2, 9)
    if rows is not None:
        np.testing.assert_array_equal(rows, whole[2:9])
    dev = E._device("cpu")
    st = E._Stack(src, np.zeros((1, 8), np.int64) + 3, dev, E._dtype(dev, None), SCHEMES)
    np.testing.assert_array_equal(st._rows(E.EMBED, 2, 9),
                                  whole[2:9].astype(np.float16).astype(np.float32))
    assert (E.EMBED in src._tables16()) == (rows is None)


@pytest.mark.parametrize("cache", [E.QUANTIZED_TABLE_CACHE, 0], ids=["held", "by-rows"])
def test_a_quantized_head_is_made_once_kept_memory_mapped_and_read_by_rows(
        tiny, tmp_path, monkeypatch, cache):
    """With a candidate folder the head is quantized once per precision (a 128k-row head's
    clipping search took 150-190 s in each of an 8B build's passes), kept as a memory-mapped
    file, and read back by row ranges where it is too large to hold as float32 (cache 0):
    the rows are the whole quantized table's, bit for bit, and the KLs those of a pass that
    quantizes every chunk itself; a later stack over the folder quantizes nothing."""
    import lsaq_compile.quantize as Q
    from lsaq_compile.export_onnx import table_scheme, table_weight

    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    monkeypatch.setattr(E, "QUANTIZED_TABLE_CACHE", cache)
    monkeypatch.setattr(E, "HEAD_CHUNK", 100)        # 512 rows: chunks end inside the table
    plans = [(("int8",) * L, {"lm_head": "int4"}), (("fp16",) * L, {"lm_head": "int8"})]
    plain = E.plans_kl(src, win, SCHEMES, plans, act)
    folder = tmp_path / "cand"
    assert E.plans_kl(src, win, SCHEMES, plans, act, candidates=folder) == plain
    for p in ("int4", "int8"):
        assert Q.table_candidate_path(folder, "lm_head", table_scheme(SCHEMES, p)).is_file()
    dev = E._device("cpu")
    st = E._Stack(src, win, dev, E._dtype(dev, None), SCHEMES, folder)
    monkeypatch.setattr(Q, "quantize", lambda *a, **k: pytest.fail("quantized again"))
    whole = np.asarray(src.tensor(E.LM_HEAD), np.float32)
    for p in ("int4", "int8"):
        want = table_weight(whole, p, SCHEMES)
        np.testing.assert_array_equal(st._rows(E.LM_HEAD, 150, 260, p), want[150:260])
        np.testing.assert_array_equal(st._rows(E.LM_HEAD, 500, 600, p), want[500:])
        assert isinstance(st._tables[E.LM_HEAD, p].packed, np.memmap)
    assert bool(st._quantized) == bool(cache)          # float32 copies only where they fit


def test_a_damaged_kept_table_is_made_again(tiny, tmp_path):
    """A kept table cut short (a kill mid-write leaves only a .part file, but a disk can still
    lose a tail) or of another scheme is not read: made again, the same bytes."""
    import lsaq_compile.quantize as Q
    from lsaq_compile.export_onnx import table_scheme

    src, win, _, _, _ = tiny
    dev = E._device("cpu")
    sch = table_scheme(SCHEMES, "int4")
    path = Q.table_candidate_path(tmp_path, "lm_head", sch)
    st = E._Stack(src, win, dev, E._dtype(dev, None), SCHEMES, tmp_path)
    good = st._rows(E.LM_HEAD, 0, 512, "int4")
    whole = path.read_bytes()
    assert Q.load_table_candidate(path, table_scheme(schemes_for("channel"), "int4")) is None
    path.write_bytes(whole[:-100])
    assert Q.load_table_candidate(path, sch) is None
    st = E._Stack(src, win, dev, E._dtype(dev, None), SCHEMES, tmp_path)
    np.testing.assert_array_equal(st._rows(E.LM_HEAD, 0, 512, "int4"), good)
    assert path.read_bytes() == whole


def test_the_store_writes_the_kept_head_not_a_new_quantization(tiny, tmp_path, monkeypatch):
    """write_weight_store takes the head the passes kept: the same store, byte for byte, as
    one that quantizes the table itself, without quantizing it again."""
    import lsaq_compile.export_onnx as X
    from lsaq_compile.export_onnx import write_weight_store

    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    dev = E._device("cpu")
    st = E._Stack(src, win, dev, E._dtype(dev, None), SCHEMES, tmp_path / "cand")
    for p in ("int4", "int8"):
        st._rows(E.LM_HEAD, 0, 1, p)
    layers = {i: {"int4"} for i in range(L)}
    kw = dict(act_stats=act, table_precisions={"lm_head": {"int4", "int8"}})
    made = write_weight_store(src, tmp_path / "made", layers, SCHEMES, **kw)
    real, vocab = X.quantize, src.spec.vocab_size
    monkeypatch.setattr(X, "quantize", lambda w, *a, **k: pytest.fail("head quantized again")
                        if np.shape(w)[0] == vocab else real(w, *a, **k))
    kept = write_weight_store(src, tmp_path / "kept", layers, SCHEMES,
                              candidates=tmp_path / "cand", **kw)
    assert kept == made
    for f in (tmp_path / "made" / "weights").iterdir():
        assert f.read_bytes() == (tmp_path / "kept" / "weights" / f.name).read_bytes()


def test_the_store_reads_writes_and_quantizes_tables_by_row_ranges(tiny, tmp_path, monkeypatch):
    """The store never reads a token table whole where the source reads row ranges (its
    float32 whole and float16 copy were 3.1 GB of an 8B store stage): the stored fp16 and
    quantized tables are those of the whole table, byte for byte, and a source without
    row-range reads gives the same store."""
    from safetensors.numpy import load_file

    import lsaq_compile.export_onnx as X
    from lsaq_compile.devices import to_float16

    src, win, act, _, _ = tiny
    L = src.spec.num_layers
    layers = {i: {"int8"} for i in range(L)}
    kw = dict(act_stats=act, table_precisions={"embed_tokens": {"int4", "int8"},
                                               "lm_head": {"int4", "int8"}})
    monkeypatch.setattr(X, "TABLE_ROWS", 100)        # 512 rows: five ranges, the last short
    whole = {n: to_float16(np.asarray(src.tensor(n), np.float32)) for n in (E.EMBED, E.LM_HEAD)}
    real = src.tensor
    monkeypatch.setattr(src, "tensor", lambda n: pytest.fail(f"{n} read whole")
                        if n in whole else real(n))
    X.write_weight_store(src, tmp_path / "rows", layers, SCHEMES, **kw)
    monkeypatch.setattr(src, "tensor", real)
    X.write_weight_store(_whole_tables(src), tmp_path / "whole", layers, SCHEMES, **kw)
    store = {}
    for f in (tmp_path / "rows" / "weights").iterdir():
        assert f.read_bytes() == (tmp_path / "whole" / "weights" / f.name).read_bytes()
        store.update(load_file(str(f)))
    for t, n in (("embed_tokens", E.EMBED), ("lm_head", E.LM_HEAD)):
        np.testing.assert_array_equal(store[n], whole[n])
        for p in ("int4", "int8"):
            sch = X.table_scheme(SCHEMES, p)
            want = X._quantized_arrays(X.quantize(whole[n], sch))
            for role, key in X.table_keys(t, p, sch).items():
                np.testing.assert_array_equal(store[key], want[role])


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """A tiny Llama stored as float16, as real checkpoints ship, and calibration windows."""
    src = open_model(make_tiny_model(tmp_path_factory.mktemp("est16") / "llama", dtype="float16"))
    win = np.random.default_rng(1).integers(3, 512, size=(E.PASS_BATCH + 2, 32))
    return src, win


def _states(folder) -> dict:
    import torch

    return {p.name: torch.load(p) for p in sorted(folder.glob("*.pt"))}


def test_the_activation_pass_keeps_the_fp16_reference_bit_for_bit(tiny16, tmp_path, monkeypatch):
    """The activation statistics' forward keeps the state leaving every layer where its
    arithmetic is the passes' (float16-stored weights, the passes' batches): the states equal
    the ones a whole-plan pass computes bit for bit, under the names it looks for, and the
    statistics are the ones measured without keeping. The tables' pass and the estimate's
    forward then run no FP16 layer, with the same KLs and the same estimate."""
    import torch

    src, win = tiny16
    L = src.spec.num_layers
    folder = tmp_path / "kept"
    sink = E.reference_sink(src, win, folder)
    assert sink is not None
    act = activation_stats(src, win, batch_size=E.PASS_BATCH, on_output=sink)
    plain_act = activation_stats(src, win, batch_size=E.PASS_BATCH)
    assert act.keys() == plain_act.keys()
    assert all(np.array_equal(act[k], plain_act[k]) for k in act)
    # the reference a pass computes and keeps itself, in a folder of its own
    ref = tmp_path / "ref"
    plain = E.table_costs(src, win, SCHEMES, ["embed_tokens"], act_stats=act,
                          kept=E.PlanStates(ref, keep=lambda e, prefix: e == "fp16"))
    kept, computed = _states(folder), _states(ref)
    assert len(kept) == L and kept.keys() == computed.keys()
    for name in kept:
        assert torch.equal(kept[name], computed[name]), name
    # passes reading the kept reference: no FP16 layer run, the very same numbers
    runs = []
    real_run = E._Stack.run
    monkeypatch.setattr(E._Stack, "run", lambda st, lay, i, h: runs.append(i) or real_run(st, lay, i, h))
    again = E.table_costs(src, win, SCHEMES, ["embed_tokens"], act_stats=act,
                          kept=E.PlanStates(folder, keep=lambda e, prefix: e == "fp16"))
    assert again == plain
    assert len(runs) == 2 * L * 2            # int8 and int4 embeddings, 2 batches a layer
    reads = []
    real_layer = E._Stack.layer
    monkeypatch.setattr(E._Stack, "layer", lambda st, i, *a: reads.append(i) or real_layer(st, i, *a))
    est = E.estimate(src, win, SCHEMES, act, probes=2, seed=0,
                     kept=E.PlanStates(folder, keep=lambda e, prefix: e == "fp16"))
    assert reads == list(reversed(range(L)))   # the backward's layers only: no forward
    reads.clear()
    base = E.estimate(src, win, SCHEMES, act, probes=2, seed=0)
    assert len(reads) == 2 * L
    for a, b in ((est.first, base.first), (est.outdiag, base.outdiag), (est.local, base.local)):
        np.testing.assert_array_equal(a, b)


def test_the_activation_pass_keeps_nothing_where_its_arithmetic_differs(tmp_path):
    """A checkpoint stored as float32 or bfloat16: the passes compute with its linears rounded
    to float16, the activation pass with them as read, so its states are not theirs."""
    win = np.random.default_rng(1).integers(3, 512, size=(4, 32))
    for dtype in ("float32", "bfloat16"):
        src = open_model(make_tiny_model(tmp_path / dtype, dtype=dtype))
        assert E.reference_sink(src, win, tmp_path / f"{dtype}-kept") is None
        assert not src.stored_as_float16("model.layers.0.self_attn.q_proj.weight")


def test_a_build_reuses_the_activation_passs_states_and_ships_the_same_bundle(tmp_path,
                                                                                monkeypatch):
    """A fisher build of a float16 checkpoint: its activation pass keeps the FP16 reference,
    the token tables' pass and the estimate's forward run no FP16 layer, and the bundle is the
    one built without it (every file's bytes; the manifest's variants)."""
    import json

    from factories.bundles import small_profile
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    ck = make_tiny_model(tmp_path / "ck16", dtype="float16")
    prof = small_profile(samples=2, seq_len=32, measure="fisher", probes=2)
    prof.build.providers, prof.build.quality_samples, prof.build.rungs = ["cpu"], 0, 2
    prof.quantization.tables, prof.build.ladder = "ladder", "bytes"   # the tables' pass too

    def build(out):
        build_bundle(ck, out, profile=prof, progress=Progress(quiet=True), remeasure=True)

    runs = []
    real_run = E._Stack.run
    monkeypatch.setattr(E._Stack, "run", lambda st, lay, i, h: runs.append(i) or real_run(st, lay, i, h))
    build(tmp_path / "with")
    with_runs = len(runs)
    monkeypatch.setattr(E, "reference_sink", lambda *a: None)
    runs.clear()
    build(tmp_path / "without")
    L = open_model(ck).spec.num_layers
    # without them the tables' pass runs the reference (and the estimate's forward reads
    # that pass's states, so it runs none in either build)
    assert len(runs) - with_runs == L

    def files(d):
        return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
                if p.is_file() and p.name != "manifest.json"}

    a, b = files(tmp_path / "with"), files(tmp_path / "without")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "with",
                                                                          tmp_path / "without"))
    assert [v["precisions"] for v in ma["variants"]] == [v["precisions"] for v in mb["variants"]]
    assert ma["variants"] == mb["variants"]


def test_float16_stored_weights_are_not_rounded_again(tiny16, tiny, monkeypatch):
    """A float16 checkpoint's weights read as float32 are the FP16 model's values already: the
    passes take them as read (rounding again cast every weight three times a pass), with the
    very numbers of rounding them; a float32 checkpoint's are rounded."""
    src, win = tiny16
    L = src.spec.num_layers
    name = "model.layers.1.mlp.down_proj.weight"
    w = src.tensor(name)
    assert src.as_fp16_model(name, w) is w
    w32 = tiny[0].tensor(name)
    np.testing.assert_array_equal(tiny[0].as_fp16_model(name, w32),
                                  w32.astype(np.float16).astype(np.float32))
    act = activation_stats(src, win)
    plans = [("int8",) * L, (("int4", "int8", "int8", "int4"), {"embed_tokens": "int8"})]
    kl = E.plans_kl(src, win, SCHEMES, plans, act)
    est = E.estimate(src, win, SCHEMES, act, probes=2, seed=0)
    monkeypatch.setattr(type(src), "stored_as_float16", lambda self, name: False)
    assert src.as_fp16_model(name, w) is not w
    assert E.plans_kl(src, win, SCHEMES, plans, act) == kl
    again = E.estimate(src, win, SCHEMES, act, probes=2, seed=0)
    for a, b in ((est.first, again.first), (est.outdiag, again.outdiag), (est.local, again.local)):
        np.testing.assert_array_equal(a, b)
