"""Variant selection with a stubbed probe and synthetic manifests (no compiler, no graphs)."""

from __future__ import annotations

import copy
import json
import random

import pytest

from lsaq_runtime.manifest import TOKENIZER_BYTES_PER_JSON_BYTE
from lsaq_runtime.errors import LsaqRuntimeError, NoVariantFits
from lsaq_runtime.planner import estimate, plan, plan_or_wait, precision_key
from lsaq_runtime.probe import Device, simulated
from factories.synthetic import MiB, host, synthetic_manifest


def gpu(index: int, free: int) -> Device:
    return Device("cuda", index, f"test gpu {index}", 80 * 2**30, int(free), "test")


def _order(m):
    return [v["name"] for v in sorted(m["variants"], key=precision_key)]


@pytest.mark.parametrize("provider_device", [host, lambda f: gpu(0, f)])
def test_shrinking_budget_never_gets_more_precise(provider_device):
    m = synthetic_manifest()
    order = _order(m)
    top = plan(m, provider_device(10**12)).rows[0].need_bytes
    smallest = plan(m, provider_device(10**12)).smallest_need
    needs = [r.need_bytes for r in plan(m, provider_device(10**12)).rows]
    # every boundary exactly (need and need - 1), plus points above and between
    budgets = sorted({top + 5 * MiB, smallest - 1, smallest // 2, *needs, *(n - 1 for n in needs),
                      *(n + 123_457 for n in needs)}, reverse=True)
    last_pos = 0
    seen = []
    for free in budgets:
        d = plan(m, provider_device(free))
        if free >= smallest:
            pos = order.index(d.chosen)
            assert pos >= last_pos, "a smaller budget chose a more precise variant"
            row = d.chosen_row
            assert row.fits and row.need_bytes <= free
            for better in d.rows[:pos]:  # no more precise variant would have fit
                assert better.need_bytes > free
            last_pos = pos
            seen.append(d.chosen)
        else:
            assert d.chosen is None and "no variant fits" in d.reason
            with pytest.raises(NoVariantFits, match="smallest"):
                plan_or_wait(m, lambda: provider_device(free), wait=0)
    assert seen[0] == "fp16" and seen[-1] == order[-1]
    assert len(set(seen)) == len(order)  # every rung of the ladder was chosen at some budget


def test_need_formula():
    m = synthetic_manifest()
    v = m["variants"][1]
    info, dep = v["providers"]["cpu"], m["deployment"]
    ctx = 777
    ws = info["workspace"]
    tok = next(f["bytes"] for f in m["files"] if f["path"] == "tokenizer/tokenizer.json")
    predicted = (info["resident_bytes"] + info["kv_bytes_per_token"] * ctx
                 + ws["fixed_bytes"] + ws["per_token_bytes"] * ctx + ws["per_token_sq_bytes"] * ctx**2
                 + dep["runtime_overhead_bytes"]["cpu"] + TOKENIZER_BYTES_PER_JSON_BYTE * tok)
    row = estimate(m, v, "cpu", ctx, 1)
    assert row.predicted_bytes == predicted
    assert row.need_bytes == predicted + max(int(0.1 * predicted), 8 * MiB)
    # batch scales the KV cache only
    assert estimate(m, v, "cpu", ctx, 2).kv_bytes == 2 * row.kv_bytes
    # the session's creation copies count instead of KV + workspace when larger; the tokenizer
    # is host memory: a CUDA plan leaves it out
    info["creation_extra_bytes"] = 10 * predicted
    big = estimate(m, v, "cpu", ctx, 1)
    assert big.predicted_bytes == predicted - row.kv_bytes - row.workspace_bytes + 10 * predicted
    cuda = estimate(m, v, "cuda", ctx, 1)
    assert cuda.overhead_bytes == dep["runtime_overhead_bytes"]["cuda"]


def test_context_changes_need_and_is_capped():
    m = synthetic_manifest()
    d_default = plan(m, host(10**12))
    assert d_default.context == 1024
    assert plan(m, host(10**12), context=4096).rows[0].need_bytes > d_default.rows[0].need_bytes
    with pytest.raises(LsaqRuntimeError, match="max_context 4096"):
        plan(m, host(10**12), context=4097)
    with pytest.raises(LsaqRuntimeError, match="at least 1"):
        plan(m, host(10**12), context=0)
    m["model"]["max_context"] = 512  # the default context never exceeds what the graphs support
    assert plan(m, host(10**12)).context == 512


def test_smaller_context_can_make_a_better_variant_fit():
    m = synthetic_manifest()
    int8_need_small = plan(m, host(10**12), context=64).rows[1].need_bytes
    d = plan(m, host(int8_need_small), context=4096)
    assert d.chosen != "int8"
    assert plan(m, host(int8_need_small), context=64).chosen == "int8"


def test_manifest_order_is_not_trusted():
    m = synthetic_manifest()
    shuffled = copy.deepcopy(m)
    random.Random(3).shuffle(shuffled["variants"])
    for free in (10**12, plan(m, host(10**12)).rows[1].need_bytes, plan(m, host(10**12)).smallest_need):
        assert plan(shuffled, host(free)).chosen == plan(m, host(free)).chosen
    assert any("most precise first; sorted" in n for n in plan(shuffled, host(10**12)).notes)
    assert not plan(m, host(10**12)).notes


def test_forced_variant():
    m = synthetic_manifest()
    d = plan(m, host(10**12), variant="int4x03")
    assert d.chosen == "int4x03" and d.forced and "forced" in d.reason
    d = plan(m, host(1 * MiB), variant="fp16")
    assert d.chosen == "fp16" and "DOES NOT FIT" in d.reason
    with pytest.raises(LsaqRuntimeError, match="unknown variant 'nope'.*fp16, int8"):
        plan(m, host(10**12), variant="nope")


def test_budget_caps_or_simulates():
    m = synthetic_manifest()
    d = plan(m, host(100 * MiB), budget=10 * 2**30)
    assert d.free_bytes == 100 * MiB and any("more than" in n for n in d.notes)
    d = plan(m, simulated(host(100 * MiB), 10 * 2**30), budget=10 * 2**30)
    assert d.free_bytes == 10 * 2**30 and d.chosen == "fp16"
    assert plan(m, host(10**12), budget=200 * MiB).free_bytes == 200 * MiB


def test_no_fit_message_says_what_to_change():
    m = synthetic_manifest()
    with pytest.raises(NoVariantFits) as e:
        plan_or_wait(m, lambda: host(50 * MiB), wait=0)
    msg = str(e.value)
    assert "int4x08" in msg and "needs" in msg and "50 MiB free" in msg and "--wait" in msg
    assert "--context" not in msg  # the weights alone do not fit: a smaller context cannot help
    # between the need at context 1 and at the requested context: suggest the context that fits
    free = (plan(m, host(10**12), context=1).smallest_need + plan(m, host(10**12)).smallest_need) // 2
    with pytest.raises(NoVariantFits) as e:
        plan_or_wait(m, lambda: host(free), wait=0)
    ctx = int(str(e.value).split("--context ")[1].split()[0])
    assert 1 <= ctx < 1024
    assert plan(m, host(free), context=ctx).chosen is not None
    assert plan(m, host(free), context=ctx + 1).chosen is None
    assert e.value.decision is not None and e.value.decision.chosen is None


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(s)
        self.t += s


def test_wait_until_memory_frees():
    m = synthetic_manifest()
    smallest = plan(m, host(10**12)).smallest_need
    clock = FakeClock()
    lines = []

    def probe():  # memory frees up after 5 seconds
        return host(smallest + MiB if clock.t >= 5 else smallest // 2)

    d = plan_or_wait(m, probe, wait=30, clock=clock, sleep=clock.sleep, poll=1.0, log=lines.append)
    assert d.chosen == _order(m)[-1]
    assert 5 <= clock.t <= 6
    assert lines and "waiting up to 30s" in lines[0] and "free" in lines[0]


def test_wait_is_bounded():
    m = synthetic_manifest()
    clock = FakeClock()
    with pytest.raises(NoVariantFits, match="after waiting 10s"):
        plan_or_wait(m, lambda: host(MiB), wait=10, clock=clock, sleep=clock.sleep, poll=2.0)
    assert 10 <= clock.t <= 10.1 and len(clock.sleeps) == 5


def test_wait_does_not_wait_for_a_budget_that_can_never_fit():
    m = synthetic_manifest()
    clock = FakeClock()
    with pytest.raises(NoVariantFits, match="--memory-budget"):
        plan_or_wait(m, lambda: host(10**12), wait=60, clock=clock, sleep=clock.sleep, budget=MiB)
    assert clock.sleeps == []


def test_decision_table_and_json():
    m = synthetic_manifest()
    free = plan(m, host(10**12)).rows[1].need_bytes
    d = plan(m, host(free))
    table = d.table()
    for v in m["variants"]:
        assert v["name"] in table
    chosen_lines = [l for l in table.splitlines() if l.startswith("*")]
    assert len(chosen_lines) == 1 and "int8" in chosen_lines[0]
    assert "avg bits" in table and "need" in table and "fits" in table
    j = json.loads(json.dumps(d.to_json()))
    assert j["chosen"] == "int8" and len(j["variants"]) == len(m["variants"])
    assert {"name", "layer_counts", "avg_bits", "need_bytes", "fits", "chosen"} <= set(j["variants"][0])


def test_missing_provider_graph():
    m = synthetic_manifest()
    for v in m["variants"]:
        del v["providers"]["cuda"]
    d = plan(m, gpu(0, 10**12))
    assert d.chosen is None and "no cuda graphs" in d.reason
    assert "no cuda graph" in d.table()


def _measured(m: dict, values: dict, rank_by: str) -> dict:
    """m with build-time quality numbers per variant (name -> value) and that ranking."""
    m = copy.deepcopy(m)
    key = "kl_fp16" if rank_by == "kl_fp16" else "perplexity"
    for v in m["variants"]:
        q = {"perplexity": 20.0, "kl_fp16": 0.0, "tokens": 2048}
        q[key] = values[v["name"]]
        v["quality"] = q
    m["deployment"]["rank_by"] = rank_by
    return m


@pytest.mark.parametrize("rank_by", ["measured_quality", "kl_fp16"])
def test_noise_never_ranks_a_coarser_variant_above_a_finer_one(rank_by):
    """A real Gemma 3 build measured perplexity 350 (fp16), 349 (int8) and 321 (a mix) on windows
    without BOS: quantization noise *lowered* a broken baseline and the runtime loaded the worst
    variant while FP16 fitted. A variant at least as precise in every part must come first
    whatever the measurement says; between variants that do not dominate each other the
    measurement decides."""
    base = synthetic_manifest()
    names = [v["name"] for v in base["variants"]]
    # inverted numbers: the more INT4 layers, the "better"
    if rank_by == "kl_fp16":
        values = {n: 0.05 - 0.002 * i for i, n in enumerate(names)}
        values["fp16"] = 0.0
    else:
        values = {n: 350.0 - 3.0 * i for i, n in enumerate(names)}
    m = _measured(base, values, rank_by)
    d = plan(m, host(10**12))
    assert d.chosen == "fp16"
    # with FP16 out of reach the most precise that fits still wins: every ladder step dominates
    # the next one here
    for r in d.rows[1:]:
        assert plan(m, host(r.need_bytes)).chosen == r.name
    assert [r.name for r in d.rows] == _order(m)


def test_measurement_decides_between_variants_that_do_not_dominate_each_other():
    m = synthetic_manifest(layers=4)
    keep = {"fp16", "int8", "int4x01", "int4x04"}
    m["variants"] = [v for v in m["variants"] if v["name"] in keep]
    a = copy.deepcopy(next(v for v in m["variants"] if v["name"] == "int4x01"))
    a["name"], a["precisions"] = "other", ["int4", "int8", "int8", "int8"]   # another INT4 layer
    for prov in a["providers"].values():
        prov["graph"] = prov["files"][0] = f"other.{prov['graph'].split('.', 1)[1]}"
        m["files"].append({"path": prov["graph"], "bytes": 10, "sha256": "0" * 64})
    m["variants"].append(a)
    # "other" measures better than int4x01, and neither is finer in every part: it goes first
    m = _measured(m, {"fp16": 0.0, "int8": 0.01, "int4x01": 0.03, "other": 0.02, "int4x04": 0.2},
                  "kl_fp16")
    order = [r.name for r in plan(m, host(10**12)).rows]
    assert order == ["fp16", "int8", "other", "int4x01", "int4x04"]
    # a noisy all-INT4 measurement below both mixes still ranks last: both dominate it
    m["variants"][-2]["quality"]["kl_fp16"] = 0.001
    assert next(v for v in m["variants"] if v["name"] == "int4x04")["quality"]["kl_fp16"] == 0.001
    order = [r.name for r in plan(m, host(10**12)).rows]
    assert order.index("int4x04") == len(order) - 1


def test_tables_take_part_in_dominance():
    """Two variants with the same linears: the one with the finer embedding table and head is
    the more precise one, whatever the measurement."""
    m = synthetic_manifest(layers=2)
    m["variants"] = [v for v in m["variants"] if v["name"] in ("fp16", "int8")]
    b = copy.deepcopy(m["variants"][1])
    b["name"], b["tables"] = "int8t", {"embed_tokens": "int4", "lm_head": "int4"}
    for prov in b["providers"].values():
        prov["lm_head"] = "int4"
        prov["graph"] = prov["files"][0] = f"int8t.{prov['graph'].split('.', 1)[1]}"
        m["files"].append({"path": prov["graph"], "bytes": 10, "sha256": "0" * 64})
    m["variants"].append(b)
    m = _measured(m, {"fp16": 0.0, "int8": 0.02, "int8t": 0.01}, "kl_fp16")
    assert [r.name for r in plan(m, host(10**12)).rows] == ["fp16", "int8", "int8t"]
