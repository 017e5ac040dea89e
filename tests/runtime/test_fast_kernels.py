"""Issue 9: the fast CPU kernel settings (accuracy level 4, small blocks, INT8 LM head), their
quality against the exact path of the same weights, thread defaults, and batched scoring."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lsaq_compile import evaluate as ev
from lsaq_compile.errors import LsaqError
from lsaq_compile.profiles import Profile, load_profile
from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.graph_check import check_graph
from lsaq_runtime.manifest import load_manifest
from lsaq_runtime.probe import physical_cores
from factories.bundles import empty_cache_feed
from factories.data import WIKITEXT


def _graph_nodes(bundle, variant, provider="cpu"):
    m = load_manifest(bundle)
    info = next(v for v in m["variants"] if v["name"] == variant)["providers"][provider]
    return info, onnx.load(str(bundle / info["graph"]), load_external_data=False)


def _attr(node, name, default=None):
    return next((a.i for a in node.attribute if a.name == name), default)


# ---------------------------------------------------------------- what the defaults build
def test_default_profile_is_the_fast_path():
    q = Profile().quantization
    assert (q.block_size, q.cpu_accuracy_level, q.cpu_lm_head) == (32, 4, "int8")
    exact = load_profile("exact").quantization
    assert (exact.cpu_accuracy_level, exact.cpu_lm_head) == (0, "fp16")


@pytest.mark.parametrize("key,value,msg", [("block_size", 48, "block_size"),
                                           ("cpu_accuracy_level", 2, "cpu_accuracy_level"),
                                           ("cpu_lm_head", "int4", "cpu_lm_head")])
def test_bad_kernel_settings_are_refused(key, value, msg):
    p = Profile()
    p.quantization = dataclasses.replace(p.quantization, **{key: value})
    with pytest.raises(LsaqError, match=msg):
        p.validate()


@pytest.mark.slow
def test_smollm_graphs_carry_the_recorded_settings(smollm_bundle):
    m = load_manifest(smollm_bundle)
    assert m["quantization"]["block_size"] == 32 and m["quantization"]["cpu_accuracy_level"] == 4
    for v in m["variants"]:
        for prov, info in v["providers"].items():
            quantized = "fp16" not in v["precisions"]
            table = v["tables"]["lm_head"]   # tied: the embedding's table
            assert info["accuracy_level"] == (4 if prov == "cpu" else 0)
            # the head computes with the variant's table; an fp16 table gets the INT8 copy on CPU
            want = table if table != "fp16" else ("int8" if prov == "cpu" and quantized else "fp16")
            assert info["lm_head"] == want
    info, g = _graph_nodes(smollm_bundle, "int4")
    v = next(x for x in m["variants"] if x["name"] == "int4")
    nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * m["model"]["num_layers"] + 1          # qkv, o, gate_up, down + head
    assert {_attr(n, "accuracy_level") for n in nbits} == {4}
    assert {_attr(n, "block_size") for n in nbits} == {32}
    p = v["tables"]["lm_head"]
    head = [n for n in nbits if n.input[1] == f"model.embed_tokens.{p}.qweight"]
    assert len(head) == 1 and _attr(head[0], "bits") == int(p[3:])
    assert not [n for n in g.graph.node if n.op_type == "Gemm"]     # no float32 head left
    _, g16 = _graph_nodes(smollm_bundle, "fp16")
    assert not [n for n in g16.graph.node if n.op_type == "MatMulNBits"]


@pytest.mark.slow
@pytest.mark.parametrize("field,value,msg", [("accuracy_level", 0, "accuracy_level 4"),
                                             ("lm_head", "fp16", "LM head is int8")])
def test_graph_check_refuses_settings_the_manifest_does_not_state(smollm_bundle, field, value, msg):
    m = load_manifest(smollm_bundle)
    v = copy.deepcopy(next(x for x in m["variants"] if x["name"] == "int8"))
    v["providers"]["cpu"][field] = value
    data = (smollm_bundle / v["providers"]["cpu"]["graph"]).read_bytes()
    with pytest.raises(LsaqRuntimeError, match=msg):
        check_graph(smollm_bundle, m, v, "cpu", data)


# ---------------------------------------------------------------- quality gate
def _exact_session(bundle, graph_file):
    """The exact path over the very same stored bytes: every MatMulNBits at accuracy level 0,
    and the LM head as the float Gemm over the fp16 table (which the graph reads anyway for its
    embedding Gather) instead of its INT8 copy."""
    from onnx import helper

    g = onnx.load(str(bundle / graph_file), load_external_data=False)
    nodes = []
    for n in g.graph.node:
        if n.op_type == "MatMulNBits" and n.input[1] == "lm_head.int8.qweight":
            nodes.append(helper.make_node("Cast", ["model.embed_tokens.weight"], ["head_f32"], to=1))
            nodes.append(helper.make_node("Gemm", [n.input[0], "head_f32"], list(n.output), transB=1))
            continue
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = 0
        nodes.append(n)
    del g.graph.node[:]
    g.graph.node.extend(nodes)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle))
    so.log_severity_level = 3
    return ort.InferenceSession(g.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_fast_kernels_keep_perplexity_of_the_exact_path(smollm_bundle, variant):
    """Level 4 over blocks of 32 and the INT8 LM head against level 0 and the float head over
    the very same stored weights, on 4 x 1024 WikiText-2 tokens: perplexity within 0.5% (the
    issue's gate), argmax agreement at least 94% (measured here: int8 +0.11% / 95.9%, int4
    -0.10% / 95.1%; on 16 x 1024 by benchmarks/bench_kernels.py, see README)."""
    m = load_manifest(smollm_bundle)
    info = next(v for v in m["variants"] if v["name"] == variant)["providers"]["cpu"]
    if not WIKITEXT.is_file():  # the gate is defined on WikiText-2 (../shared/data)
        pytest.skip(f"{WIKITEXT} missing")
    tw = ev.text_windows(WIKITEXT, smollm_bundle, 1024, 4)
    fast = ev.onnx_logits_fn(smollm_bundle, m, variant)
    exact = _exact_session(smollm_bundle, info["graph"])
    nll = {"fast": 0.0, "exact": 0.0}
    agree = []
    for w in tw.windows:
        ids = [int(x) for x in w]
        for name, logits in (("fast", fast(w)), ("exact", exact.run(["logits"], empty_cache_feed(m, ids))[0][0])):
            nll[name] -= ev.token_logprobs(logits, w[1:]).sum()
            if name == "fast":
                a = logits.argmax(-1)
            else:
                agree.append(np.mean(a == logits.argmax(-1)))
    ratio = math.exp((nll["fast"] - nll["exact"]) / (4 * 1023))
    assert abs(ratio - 1) < 0.005, ratio
    assert np.mean(agree) >= 0.94, agree


# ---------------------------------------------------------------- threads
def _fake_cpus(tmp_path, cores):
    for cpu, (pkg, core) in enumerate(cores):
        d = tmp_path / "cpu" / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "physical_package_id").write_text(f"{pkg}\n")
        (d / "core_id").write_text(f"{core}\n")
    return str(tmp_path / "cpu")


def test_physical_cores_counts_cores_not_hyperthreads(tmp_path):
    root = _fake_cpus(tmp_path, [(0, 0), (0, 1), (0, 0), (0, 1), (1, 0), (1, 1)])
    nocg = str(tmp_path / "nocgroup")
    assert physical_cores(root, {0, 1, 2, 3, 4, 5}, nocg) == 4
    assert physical_cores(root, {0, 2}, nocg) == 1             # two hyperthreads of one core
    assert physical_cores(root, {0, 4}, nocg) == 2             # same core id, other socket
    assert physical_cores(str(tmp_path / "missing"), {0, 1, 2}, nocg) == 3  # no topology: CPUs


def test_physical_cores_respects_a_cgroup_quota(tmp_path):
    root = _fake_cpus(tmp_path, [(0, c) for c in range(8)])
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cpu.max").write_text("150000 100000\n")
    assert physical_cores(root, set(range(8)), str(cg)) == 2   # 1.5 CPUs, rounded up
    (cg / "cpu.max").write_text("max 100000\n")
    assert physical_cores(root, set(range(8)), str(cg)) == 8
    (cg / "cpu.max").unlink()
    (cg / "cpu").mkdir()
    (cg / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (cg / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert physical_cores(root, set(range(8)), str(cg)) == 3


def test_runtime_defaults_to_physical_cores(tiny_bundle):
    import lsaq_runtime

    with lsaq_runtime.load(tiny_bundle, device="cpu", context=32) as model:
        assert model.threads == physical_cores()
        assert set(model.load_seconds) == {"plan", "verify", "session", "kv"}
    with lsaq_runtime.load(tiny_bundle, device="cpu", context=32, threads=1) as model:
        assert model.threads == 1


# ---------------------------------------------------------------- batched scoring
def test_score_batch_equals_one_at_a_time(tiny_bundle):
    import lsaq_runtime

    rng = np.random.default_rng(0)
    rows = [list(map(int, rng.integers(3, 200, n))) for n in (9, 30, 2, 17)]
    starts = [3, 0, 1, 16]
    with lsaq_runtime.load(tiny_bundle, device="cpu", context=64, variant="int8") as model:
        batched = model.score_batch(rows, starts)
        for r, s, b in zip(rows, starts, batched):
            single = model.score_tokens(r)[s:]
            assert b.shape == single.shape
            np.testing.assert_allclose(b, single, rtol=0, atol=1e-5)
        with pytest.raises(LsaqRuntimeError, match="start"):
            model.score_batch(rows, [0, 0, 2, 0])


def test_loglikelihoods_share_rows_and_match_the_plain_computation(tiny_bundle):
    """Equal inputs and prefixes share one row; the results equal one call per request."""
    m = load_manifest(tiny_bundle)
    fn = ev.onnx_logits_fn(tiny_bundle, m, "fp16")
    calls = []

    def plain(ids):
        calls.append(len(ids))
        return fn(ids)

    reqs = [([5, 6, 7, 8], 3), ([5, 6, 7, 9], 3),          # one-token answers: same input
            ([5, 6, 7, 8, 10, 11], 3),                      # its input extends the first two
            ([20, 21, 22], 1), ([30, 31], 1)]
    got = ev.loglikelihoods(plain, reqs)
    assert sorted(calls) == [1, 2, 5]                       # 5 requests, 3 rows
    batched = ev.loglikelihoods(fn, reqs, max_tokens=8)     # several runs of .batch
    for (whole, n_ctx), (ll, greedy), (ll2, greedy2) in zip(reqs, got, batched):
        lp = ev._log_softmax(fn(np.asarray(whole[:-1]))[n_ctx - 1:])
        want = float(sum(lp[i, t] for i, t in enumerate(whole[n_ctx:])))
        assert ll == pytest.approx(want, abs=1e-4) and ll2 == pytest.approx(want, abs=1e-4)
        assert greedy == greedy2


def test_split_request_follows_lm_eval():
    enc = lambda s: [ord(c) for c in s]
    assert ev.split_request(enc, "Q: a ", "b") == ([ord(c) for c in "Q: a b"], 4)
    with pytest.raises(LsaqError, match="no tokens"):
        ev.split_request(enc, "Q", "")
