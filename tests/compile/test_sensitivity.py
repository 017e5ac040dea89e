"""Measured sensitivity, the byte-budget knapsack, per-part plans and quality-ranked bundles."""

import itertools
import json
import random

import numpy as np
import pytest
from lsaq_runtime.planner import quality_order
import torch

from lsaq_compile import sensitivity
from lsaq_compile.bundle import build_bundle, read_manifest
from lsaq_compile.errors import LsaqError
from lsaq_compile.model_source import open_model
from lsaq_compile.plan import Plan, allocate, byte_budgets, part_bytes, part_params
from lsaq_compile.progress import Progress
from lsaq_compile.quantize import QuantScheme, quantize, schemes_for, stored_bytes
from lsaq_compile.reference import reference_model
from lsaq_runtime.format import join_precision, split_precision
from factories.bundles import small_profile


# ------------------------------------------------------------------------ knapsack
def _brute(costs, weights, budget):
    best = None
    for choice in itertools.product(*[list(c) for c in costs]):
        w = sum(wt[k] for wt, k in zip(weights, choice))
        c = sum(ct[k] for ct, k in zip(costs, choice))
        if w <= budget and (best is None or c < best):
            best = c
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocate_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(3, 7)
    keys = ["a", "b", "c"][: rng.randint(2, 3)]
    costs = [{k: rng.random() * (3 - j) for j, k in enumerate(keys)} for _ in range(n)]
    weights = [{k: rng.randint(1, 40) * (j + 1) for j, k in enumerate(keys)} for _ in range(n)]
    lo = sum(min(w.values()) for w in weights)
    hi = sum(max(w.values()) for w in weights)
    budgets = sorted({lo, hi, *(rng.randint(lo, hi) for _ in range(5))})
    for budget, choice in zip(budgets, allocate(costs, weights, budgets)):
        used = sum(w[k] for w, k in zip(weights, choice))
        got = sum(c[k] for c, k in zip(costs, choice))
        assert used <= budget
        assert got == pytest.approx(_brute(costs, weights, budget), abs=1e-12)


def test_allocate_with_coarse_units_stays_within_budget_and_reaches_both_ends():
    rng = random.Random(5)
    costs = [{"int8": rng.random() * 0.01, "int4": rng.random()} for _ in range(40)]
    weights = [{"int8": rng.randint(900, 1100) * 2, "int4": rng.randint(900, 1100)} for _ in range(40)]
    low = sum(w["int4"] for w in weights)
    high = sum(w["int8"] for w in weights)
    budgets = byte_budgets(low, high, 8)
    plans = allocate(costs, weights, budgets, cells=400)    # units of ~200 B: rounding + repair
    assert plans[0] == ["int4"] * 40 and plans[-1] == ["int8"] * 40
    for b, choice in zip(budgets, plans):
        assert sum(w[k] for w, k in zip(weights, choice)) <= b
    fine = allocate(costs, weights, budgets)                # unit 1: exact
    for b, coarse, exact in zip(budgets, plans, fine):
        cost = lambda ch: sum(c[k] for c, k in zip(costs, ch))  # noqa: E731
        assert cost(exact) <= cost(coarse) + 1e-12
        assert cost(coarse) <= cost(exact) + 1.0            # at most about one item's decision
    with pytest.raises(LsaqError, match="below the smallest plan"):
        allocate(costs, weights, [low - 1])
    assert byte_budgets(100, 200, 4) == [100, 125, 150, 175, 200]


@pytest.mark.parametrize("scheme", [QuantScheme(8, "channel"), QuantScheme(4, "channel", block_size=32),
                                    QuantScheme(4, "group", 32, True), QuantScheme(4, "group", 64, False),
                                    QuantScheme(4, "group", 128, False)])
@pytest.mark.parametrize("shape", [(8, 96), (5, 160), (3, 64)])
def test_stored_bytes_is_what_quantize_stores(scheme, shape):
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    assert stored_bytes(*shape, scheme) == quantize(w, scheme).nbytes


def test_plan_counts_and_nominal_bits_of_mixed_layers():
    p = Plan("x", ("int8", "int8/int4", "int4/int8", "int4", "int4/int4/int4/int8"))
    assert p.counts == {"fp16": 0, "int8": 1, "int4": 1, "mixed": 3}
    # qkv, o: 1 weight each; gate_up 2, down 1: attention 2 and MLP 3 weights per layer
    w = {"qkv": 1, "o": 1, "gate_up": 2, "down": 1}
    assert p.avg_bits_nominal(w) == pytest.approx(
        (8 * 5 + (8 * 2 + 4 * 3) + (4 * 2 + 8 * 3) + 4 * 5 + (4 * 4 + 8)) / 25)


# ------------------------------------------------------------------------ the meter
@pytest.fixture(scope="module")
def tiny_meter(tiny_llama_dir):
    from lsaq_compile.calibration import load_calibration, load_tokenizer

    src = open_model(tiny_llama_dir)
    calib = load_calibration(None, load_tokenizer(src), samples=3, seq_len=32)
    schemes = schemes_for("group", 32, symmetric=False)
    return src, schemes, calib, sensitivity.KLMeter(src, calib.windows, schemes)


def _kl_from_reference(src, schemes, windows, precisions):
    """Mean KL(FP16 || plan) with transformers' full models of both plans: the meter's
    layer-by-layer arithmetic checked against an independent forward."""
    ref = reference_model(src, ["fp16"] * src.spec.num_layers, schemes)
    q = reference_model(src, list(precisions), schemes)
    ids = torch.from_numpy(np.asarray(windows, np.int64))
    with torch.no_grad():
        p = torch.log_softmax(ref(ids).logits[:, :-1].float(), -1)
        lq = torch.log_softmax(q(ids).logits[:, :-1].float(), -1)
    return float((p.exp() * (p - lq)).sum(-1).mean())


@pytest.mark.parametrize("precisions", [("int4",) * 4, ("fp16", "int8/int4", "int4/int8", "int8"),
                                        ("fp16", "fp16", "fp16", "fp16/int4"),
                                        ("int4/int8/int8/int4", "fp16", "int8/int8/int4/int8", "int4")])
def test_meter_agrees_with_full_reference_models(tiny_meter, precisions):
    src, schemes, calib, meter = tiny_meter
    want = _kl_from_reference(src, schemes, calib.windows, precisions)
    assert meter.kl(list(precisions)) == pytest.approx(want, rel=2e-3, abs=1e-7)
    assert meter.kl(["fp16"] * 4) == 0.0
    # the meter restores FP16 weights after each plan
    assert meter.kl(list(precisions)) == pytest.approx(want, rel=2e-3, abs=1e-7)


def test_measure_costs_every_part_and_int4_costs_more(tiny_meter):
    src, schemes, calib, meter = tiny_meter
    sens = sensitivity.measure(meter)
    for part in ("attn", "mlp"):
        assert len(sens.cost[part]) == 4
        for c in sens.cost[part]:
            assert c["int4"] > c["int8"] >= 0
    L = 4
    assert sens.cost["mlp"][2]["int4"] == meter.kl(sensitivity.part_plan(L, 2, "mlp", "int4"))
    assert sens.layer_importance()[1] == sens.cost["attn"][1]["int4"] + sens.cost["mlp"][1]["int4"]


def test_linear_granularity_measures_each_stored_linear(tiny_meter):
    src, schemes, calib, meter = tiny_meter
    units = sensitivity.GRANULARITY["linear"]
    assert units == ("qkv", "o", "gate_up", "down")
    assert sensitivity.part_plan(4, 1, "down", "int4")[1] == "fp16/fp16/fp16/int4"
    assert sensitivity.part_plan(4, 1, "qkv", "int8")[1] == "int8/fp16/fp16/fp16"
    sens = sensitivity.measure(meter, units=units)
    assert sens.units == units
    assert sens.cost["o"][3]["int4"] == meter.kl(sensitivity.part_plan(4, 3, "o", "int4"))
    for u in units:
        assert all(c["int4"] > c["int8"] >= 0 for c in sens.cost[u])
    # bytes of the four linears add up to the two halves'
    for p in ("int8", "int4"):
        assert sum(part_bytes(src.spec, u, p, schemes) for u in units) == \
            part_bytes(src.spec, "attn", p, schemes) + part_bytes(src.spec, "mlp", p, schemes)
    # an extra rung at given average bits, kept within its bytes; finer choices than the halves
    params = 4 * sum(part_params(src.spec).values())
    plans, kl, _ = sensitivity.ladder_plans(meter, sens, schemes, "bytes", rungs=2, refine=0,
                                            rung_bits=[5.3])
    sizes = sensitivity.layer_part_sizes(src.spec, schemes, units)
    bits = [8 * sensitivity._plan_bytes(p.precisions, sizes) / params for p in plans[1:]]
    assert bits == sorted(bits, reverse=True) and len(plans) == 5
    assert max(b for b in bits if b <= 5.3) > 5.3 - 0.5 and any(b <= 5.3 for b in bits[1:-1])
    assert any(len(q.split("/")) == 4 for p in plans for q in p.precisions)
    for p in plans[1:]:
        assert kl[p.name] == pytest.approx(meter.kl(list(p.precisions)))
    with pytest.raises(LsaqError, match="rung_bits 9.0.*pick a value"):
        sensitivity.ladder_plans(meter, sens, schemes, "bytes", rungs=2, refine=0, rung_bits=[9.0])


def test_ladder_plans_fit_their_budgets_and_are_validated(tiny_meter):
    src, schemes, calib, meter = tiny_meter
    sens = sensitivity.measure(meter)
    plans, kl, fit = sensitivity.ladder_plans(meter, sens, schemes, "bytes", rungs=4, refine=1)
    sizes = sensitivity.layer_part_sizes(src.spec, schemes)
    L = src.spec.num_layers
    low = L * (part_bytes(src.spec, "attn", "int4", schemes) + part_bytes(src.spec, "mlp", "int4", schemes))
    high = L * (part_bytes(src.spec, "attn", "int8", schemes) + part_bytes(src.spec, "mlp", "int8", schemes))
    budgets = byte_budgets(low, high, 4)
    assert plans[0].name == "fp16" and plans[1].name == "int8" and plans[-1].name == "int4"
    got = [sensitivity._plan_bytes(p.precisions, sizes) for p in plans[1:]]
    assert got == sorted(got, reverse=True) and got[0] == high and got[-1] == low
    for b, budget in zip(got, budgets[::-1]):
        assert b <= budget
    assert any(p.counts["mixed"] for p in plans)
    for p in plans[1:]:  # the KL recorded is the whole plan's, measured
        assert kl[p.name] == pytest.approx(meter.kl(list(p.precisions)))
    assert fit["plans"] >= 3 and 0.5 < fit["slope"] < 2.0
    paper, _, _ = sensitivity.ladder_plans(meter, sens, schemes, "paper", refine=0)
    assert [p.name for p in paper] == ["fp16", "int8", "int4x1", "int4x2", "int4x3", "int4"]


def test_sensitivity_scores_round_trip_and_refuse_other_schemes(tiny_meter):
    from lsaq_compile.importance import Scores

    src, schemes, calib, _ = tiny_meter
    sc, meter = sensitivity.score(src, calib, calib.windows[:2], schemes)
    back = Scores.from_json(json.loads(json.dumps(sc.to_json())))
    sens = sensitivity.from_scores(back, schemes)
    assert sens.cost == sensitivity.measure(meter).cost
    assert back.order == sorted(range(4), key=lambda i: (sc.importance[i], i))
    with pytest.raises(LsaqError, match="score again"):
        sensitivity.from_scores(back, schemes_for("channel"))
    broken = Scores.from_json({**sc.to_json(), "params": {"int8": schemes["int8"].name,
                                                           "int4": schemes["int4"].name}})
    with pytest.raises(LsaqError, match="per-part costs"):
        sensitivity.from_scores(broken, schemes)


def test_scores_of_another_granularity_are_refused(tiny_meter, tiny_llama_dir, tmp_path):
    src, schemes, calib, _ = tiny_meter
    sc, _ = sensitivity.score(src, calib, calib.windows[:2], schemes, granularity="block")
    prof = small_profile(samples=2, seq_len=32)
    prof.build.rungs, prof.build.quality_samples = 2, 0
    prof.quantization.clip = "none"
    assert prof.scoring.granularity == "linear"
    out = tmp_path / "b"
    with pytest.raises(LsaqError, match="measured attn/mlp.*score again"):
        build_bundle(tiny_llama_dir, out, profile=prof, scores=sc, progress=Progress(quiet=True))
    assert not out.exists()
    with pytest.raises(LsaqError, match="granularity 'layer'"):
        sensitivity.score(src, calib, calib.windows[:2], schemes, granularity="layer")


# ------------------------------------------------------------------------ bundles
@pytest.fixture(scope="module")
def tiny_sensitivity_bundle(tiny_llama_dir, tmp_path_factory):
    prof = small_profile(samples=3, seq_len=48)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 3, 1, 2
    prof.quantization.cpu_accuracy_level, prof.quantization.cpu_lm_head = 0, "fp16"
    prof.quantization.clip = "none"   # its torch reference needs no activation statistics
    prof.scoring.granularity = "linear"   # per-linear precisions end to end (default: halves)
    out = tmp_path_factory.mktemp("sens") / "b"
    return build_bundle(tiny_llama_dir, out, profile=prof, progress=Progress(quiet=True))


def test_bundle_records_quality_and_ranks_by_it(tiny_sensitivity_bundle):
    m = read_manifest(tiny_sensitivity_bundle)
    assert m["scores"]["metric"] == "sensitivity"
    assert m["deployment"]["rank_by"] == "kl_fp16"
    kl = [v["quality"]["kl_fp16"] for v in m["variants"]]
    assert kl[0] == 0.0 and m["variants"][0]["name"] == "fp16" and all(k > 0 for k in kl[1:])
    # listed in the runtime's order: best KL first, never above a variant that dominates it
    assert [v["name"] for v in quality_order(m["variants"], "kl_fp16")] == \
        [v["name"] for v in m["variants"]]
    assert [v["rank"] for v in m["variants"]] == list(range(len(kl)))
    assert all(v["quality"]["perplexity"] > 1 for v in m["variants"])
    names = {v["name"] for v in m["variants"]}
    assert {"fp16", "int8", "int4"} <= names and len(names) == 6   # 4 rungs, + fp16 tables
    # the rung between all-INT8 and FP16: INT8 linears, fp16 tables
    t16 = max((v for v in m["variants"] if v["name"] != "fp16"), key=lambda v: v["weight_bytes"])
    assert set(t16["tables"].values()) == {"fp16"} and t16["layer_counts"]["int8"] == 4
    assert all(v["tables"]["embed_tokens"] in ("int8", "int4") for v in m["variants"]
               if v["name"] not in ("fp16", t16["name"]))
    assert any(v["layer_counts"]["mixed"] for v in m["variants"])
    assert "additive_fit" in m["scores"]["params"]


def test_mixed_variant_graph_matches_its_reference(tiny_sensitivity_bundle, tiny_llama_dir):
    """ONNX graph of a per-part plan against transformers with the same dequantized weights."""
    import lsaq_runtime

    m = read_manifest(tiny_sensitivity_bundle)
    v = next(v for v in m["variants"] if v["layer_counts"]["mixed"])
    q = m["quantization"]
    schemes = schemes_for(q["scheme"], q["group_size"], q["symmetric"], q["block_size"])
    assert v["tables"]["embed_tokens"] != "fp16"   # the tables are on the ladder too
    ref = reference_model(open_model(tiny_llama_dir), v["precisions"], schemes,
                          tables=v["tables"])
    ids = [int(x) for x in np.random.default_rng(3).integers(3, 500, size=40)]
    model = lsaq_runtime.load(tiny_sensitivity_bundle, context=64, device="cpu", variant=v["name"])
    got = model.score_tokens(ids)
    model.close()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].float().numpy()
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-3)


def test_runtime_picks_best_measured_quality_that_fits(tiny_sensitivity_bundle):
    from lsaq_runtime.manifest import validate_manifest
    from lsaq_runtime.planner import dominates, plan
    from lsaq_runtime.probe import Device, simulated

    m = read_manifest(tiny_sensitivity_bundle)
    host = Device("cpu", None, "sim", 2**40, 2**40, "test")
    d = plan(m, host)
    assert d.chosen == m["variants"][0]["name"] == "fp16" and "best measured quality" in d.reason
    need = {r.name: r.need_bytes for r in d.rows}
    by_bytes = sorted(m["variants"], key=lambda v: -need[v["name"]])
    # Invert the measurements (the fewer bytes, the "better"): between two variants the runtime
    # takes the one that measured better unless the other is at least as precise in every part.
    for k, v in enumerate(by_bytes):
        v["quality"]["kl_fp16"] = 0.0 if v["name"] == "fp16" else 1.0 - 0.1 * k
    validate_manifest(m)
    for a, b in zip(by_bytes[1:], by_bytes[2:]):
        d = plan(m, simulated(host, need[a["name"]]), budget=need[a["name"]])
        assert d.chosen == (a["name"] if dominates(a, b) else b["name"])
    del by_bytes[2]["quality"]
    with pytest.raises(Exception, match="no measured quality"):
        validate_manifest(m)


def test_graph_check_reads_each_part(tiny_sensitivity_bundle):
    from lsaq_runtime.errors import LsaqRuntimeError
    from lsaq_runtime.graph_check import check_graph

    m = read_manifest(tiny_sensitivity_bundle)
    v = next(v for v in m["variants"] if v["layer_counts"]["mixed"])
    data = (tiny_sensitivity_bundle / v["providers"]["cpu"]["graph"]).read_bytes()
    check_graph(tiny_sensitivity_bundle, m, v, "cpu", data)
    i = next(i for i, p in enumerate(v["precisions"]) if "/" in p)
    have = split_precision(v["precisions"][i])
    other = {"int8": "int4", "int4": "int8", "fp16": "int8"}
    for part in ("qkv", "down", "gate_up"):
        claim = join_precision({**have, part: other[have[part]]})
        bad = {**v, "precisions": [*v["precisions"][:i], claim, *v["precisions"][i + 1:]]}
        with pytest.raises(LsaqRuntimeError, match=f"layer {i}'s {part} computes with"):
            check_graph(tiny_sensitivity_bundle, m, bad, "cpu", data)
