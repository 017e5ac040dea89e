import random

import pytest

from lsaq_compile.errors import LsaqError
from lsaq_compile.plan import ladder, mix_plan, paper_counts


def _order(L, seed=1):
    o = list(range(L))
    random.Random(seed).shuffle(o)
    return o


@pytest.mark.parametrize("L", [4, 30, 32])
def test_full_ladder_counts_and_monotone_bits(L):
    order = _order(L)
    plans = ladder(order, "full")
    assert len(plans) == L + 2
    assert [p.name for p in plans[:2]] == ["fp16", "int8"] and plans[-1].name == "int4"
    assert [p.counts["int4"] for p in plans[1:]] == list(range(L + 1))
    bits = [p.avg_bits_nominal() for p in plans]
    assert all(a > b for a, b in zip(bits, bits[1:])), "each variant is strictly less precise"
    for p in plans[1:]:  # INT4 exactly on the n least important layers
        assert set(p.int4_layers) == set(order[: p.counts["int4"]])
        assert p.counts["fp16"] == 0


def test_paper_ladder_uses_least_important_quarters():
    L = 30
    order = _order(L, seed=7)
    plans = ladder(order, "paper")
    assert [p.name for p in plans] == ["fp16", "int8", "int4x08", "int4x15", "int4x23", "int4"]
    for p, frac in zip(plans[2:5], (0.25, 0.5, 0.75)):
        n = p.counts["int4"]
        assert abs(n - frac * L) <= 0.5
        assert set(p.int4_layers) == set(order[:n])
    # the paper's 7, 6 and 5 average bits (32 layers divide exactly)
    plans32 = ladder(_order(32), "paper")
    assert [p.avg_bits_nominal() for p in plans32] == [16, 8, 7, 6, 5, 4]
    assert paper_counts(32) == [8, 16, 24]


def test_weighted_nominal_bits_and_bad_orders():
    p = mix_plan([1, 0], 1)
    assert p.precisions == ("int8", "int4")
    w = {"qkv": 1, "o": 2, "gate_up": 4, "down": 1}
    assert p.avg_bits_nominal(w) == (8 + 4) / 2   # layers weigh alike
    with pytest.raises(LsaqError, match="permutation"):
        ladder([0, 0, 1], "full")
    with pytest.raises(LsaqError, match="unknown ladder"):
        ladder([0, 1], "half")
