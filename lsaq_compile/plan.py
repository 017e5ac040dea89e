"""Stage 3: precision plans. From a layer order (least important first) to one plan per variant.

INT8 everywhere, then INT4 on the n least important layers (the paper's strategy). A ladder is
the list of plans a bundle ships, most precise first — the order the runtime walks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from lsaq_runtime.manifest import LINEAR_PART, PARTS, split_precision

from .errors import LsaqError
from .quantize import QuantScheme, stored_bytes

BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
PAPER_FRACTIONS = (0.25, 0.50, 0.75)


@dataclass(frozen=True)
class Plan:
    name: str
    precisions: tuple[str, ...]           # one per decoder layer
    # the token tables' precisions, as (table, precision) pairs ("embed_tokens", "lm_head");
    # a table not listed is fp16. A tied model lists only embed_tokens (the head reads it).
    tables: tuple[tuple[str, str], ...] = ()

    def table(self, which: str, tied: bool = False) -> str:
        """The precision of a token table ("embed_tokens" or "lm_head")."""
        t = dict(self.tables)
        if tied and which == "lm_head":
            which = "embed_tokens"
        return t.get(which, "fp16")

    @property
    def counts(self) -> dict[str, int]:
        """Layers wholly at each precision, and layers whose linears differ ("mixed")."""
        c = {p: self.precisions.count(p) for p in ("fp16", "int8", "int4")}
        c["mixed"] = sum("/" in p for p in self.precisions)
        return c

    @property
    def int4_layers(self) -> list[int]:
        return [i for i, p in enumerate(self.precisions) if p == "int4"]

    def avg_bits_nominal(self, part_params: dict[str, int] | None = None) -> float:
        """Bits per decoder-linear weight, scales ignored (the paper's 8/7/6/5/4 figures).
        part_params: weights in each of a layer's stored linears, by part (equal if not given)."""
        w = part_params or {part: 1 for part in PARTS}
        bits = sum(BITS[split_precision(p)[part]] * w[part] for p in self.precisions
                   for part in PARTS)
        return bits / (len(self.precisions) * sum(w.values()))


def avg_bits_real(layer_bytes: list[int], layer_params: list[int]) -> float:
    """Bits per decoder-linear weight from the bytes actually stored (scales included)."""
    return 8.0 * sum(layer_bytes) / sum(layer_params)


def _validate_order(order: list[int], num_layers: int) -> None:
    if sorted(order) != list(range(num_layers)):
        raise LsaqError(f"layer order must be a permutation of 0..{num_layers - 1}; "
                        f"got {len(order)} entries — do the scores belong to this model?")


def mix_plan(order: list[int], n_int4: int) -> Plan:
    """INT8 everywhere, INT4 on the n_int4 least important layers."""
    L = len(order)
    low = set(order[:n_int4])
    prec = tuple("int4" if i in low else "int8" for i in range(L))
    if n_int4 == 0:
        return Plan("int8", prec)
    if n_int4 == L:
        return Plan("int4", prec)
    return Plan(f"int4x{n_int4:0{len(str(L))}d}", prec)


def paper_counts(num_layers: int) -> list[int]:
    """INT4 layer counts for 25/50/75%: round half up, so 30 layers give 8, 15, 23."""
    return [math.floor(f * num_layers + 0.5) for f in PAPER_FRACTIONS]


def ladder(order: list[int], kind: str = "full") -> list[Plan]:
    """Plans most precise first. 'paper': FP16, INT8, INT4 on 25/50/75% and all layers.
    'full': FP16, INT8, then INT4 on the n least important layers for every n = 1..L."""
    L = len(order)
    _validate_order(order, L)
    if kind == "paper":
        counts = sorted(set(c for c in paper_counts(L) if 0 < c < L)) + [L]
    elif kind == "full":
        counts = list(range(1, L + 1))
    else:
        raise LsaqError(f"unknown ladder {kind!r}; use 'full' or 'paper'")
    return [Plan("fp16", ("fp16",) * L), mix_plan(order, 0)] + [mix_plan(order, n) for n in counts]


# ---------------------------------------------------------------- allocation by bytes
# What the allocation may give a precision of its own: a layer's attention (qkv, o) or MLP
# (gate_up, down) half, or one stored linear (a part).
UNITS = {"attn": ("self_attn.qkv_proj", "self_attn.o_proj"),
         "mlp": ("mlp.gate_up_proj", "mlp.down_proj"),
         **{part: (lin,) for lin, part in LINEAR_PART.items()}}
def linear_shapes(spec) -> dict[str, tuple[int, int]]:
    """[N, K] of each stored (fused) linear of one decoder layer."""
    h, hd, i = spec.hidden_size, spec.head_dim, spec.intermediate_size
    return {"self_attn.qkv_proj": ((spec.num_heads + 2 * spec.num_kv_heads) * hd, h),
            "self_attn.o_proj": (h, spec.num_heads * hd),
            "mlp.gate_up_proj": (2 * i, h), "mlp.down_proj": (h, i)}


def part_params(spec) -> dict[str, int]:
    """Weights in each stored linear of one layer, by part (qkv, o, gate_up, down)."""
    return {LINEAR_PART[lin]: n * k for lin, (n, k) in linear_shapes(spec).items()}


def part_bytes(spec, unit: str, precision: str, schemes: dict[str, QuantScheme]) -> int:
    """Exact stored bytes of one unit of a layer (a part, or "attn"/"mlp") at one precision."""
    total = 0
    for lin in UNITS[unit]:
        n, k = linear_shapes(spec)[lin]
        total += {"fp32": 4, "fp16": 2}.get(precision, 0) * n * k or \
            stored_bytes(n, k, schemes[precision])
    return total


def allocate(costs: list[dict[str, float]], weights: list[dict[str, int]],
             budgets: list[int], cells: int = 200_000) -> list[list[str]]:
    """Multiple-choice knapsack: for each budget, one choice per item (a key of its costs)
    minimising the summed cost with summed weight <= budget. One dynamic program over capacity
    serves every budget.

    Capacity is counted in units of the weights' greatest common divisor, which is exact (a
    model's layers repeat a few sizes, so the divisor is large). Only when that would take more
    than `cells` cells are weights rounded to units of max(budgets)/cells; a solution whose exact
    bytes then overshoot is repaired by the cheapest downgrades per byte saved."""
    if not costs or len(costs) != len(weights):
        raise LsaqError("allocate: one cost and one weight table per item")
    need = sum(min(w.values()) for w in weights)
    for b in budgets:
        if b < need:
            raise LsaqError(f"a budget of {b:,} bytes is below the smallest plan ({need:,} bytes)")
    unit = math.gcd(*(int(v) for w in weights for v in w.values())) or 1
    if max(budgets) // unit > cells:
        unit = -(-max(budgets) // cells)
    cap = max(budgets) // unit
    units = [{k: round(v / unit) for k, v in w.items()} for w in weights]
    best = np.zeros(cap + 1)                      # no items: cost 0 at any capacity
    picks = []
    for c, u in zip(costs, units):
        keys = list(c)
        new = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, np.int16)
        for j, key in enumerate(keys):
            if u[key] > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u[key]:] = best[:cap + 1 - u[key]] + c[key]
            better = cand < new
            new[better], arg[better] = cand[better], j
        best = new
        picks.append((keys, arg))

    out = []
    for b in budgets:
        at = b // unit
        while not np.isfinite(best[at]):  # only after rounding: the smallest plan fits exactly
            at += 1
        choice = []
        for (keys, arg), u in zip(reversed(picks), reversed(units)):
            key = keys[arg[at]]
            choice.append(key)
            at -= u[key]
        out.append(_repair(choice[::-1], costs, weights, b))
    return out


def _repair(choice: list[str], costs, weights, budget: int) -> list[str]:
    """Downgrade items, cheapest cost increase per byte saved first, until the bytes fit."""
    choice = list(choice)
    used = sum(w[k] for w, k in zip(weights, choice))
    while used > budget:
        moves = [((costs[j][k] - costs[j][choice[j]]) / (weights[j][choice[j]] - weights[j][k]), j, k)
                 for j in range(len(choice)) for k in costs[j]
                 if weights[j][k] < weights[j][choice[j]]]
        _, j, k = min(moves)
        used -= weights[j][choice[j]] - weights[j][k]
        choice[j] = k
    return choice


def byte_budgets(low: int, high: int, rungs: int) -> list[int]:
    """`rungs` + 1 budgets evenly spaced from `low` (all INT4) to `high` (all INT8)."""
    return [low + (high - low) * r // rungs for r in range(rungs + 1)]
