"""Measured sensitivity: how much quantizing each part of each layer moves the model's output.

The paper ranks layers by a proxy (how a layer changes the top-k tokens of its hidden state);
here the quantity the ladder trades against bytes is measured directly. On calibration windows,
for every stored linear of every decoder layer (qkv, o, gate_up, down; or, coarser, its
attention and MLP halves) separately, and for every
quantized precision the bundle can hold, quantize that part alone (everything else FP16) and
measure the mean KL divergence of the final next-token distributions from the FP16 model's.

    cost(plan) ~ sum over parts of cost(part, its precision)          (the additive model)

`plan.allocate` then picks, for any byte budget, the precision of every part that minimises the
summed cost (a multiple-choice knapsack). Single-part errors do not add exactly, so each chosen
plan is measured as a whole (`KLMeter.kl`) and refined greedily by swaps that keep its bytes.

Layers run one module per decoder layer (transformers' own class), with the FP16 inputs of every
layer cached once, so a single-part measurement only runs the layers from that part's layer on.
All weights sit in memory as float32 (four bytes a weight, ~0.5 GB for a 135M model): this stage
is meant for the small and mid-sized models this machine can hold.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from lsaq_runtime.format import LINEAR_PART, PARTS, STORED_OF, join_precision

from .errors import LsaqError
from .export_onnx import (EMBED, FINAL_NORM, LM_HEAD, act_key, effective_linear_weight,
                          part_precision, table_scheme, table_weight)
from .layerwise import (_classes, as_tensor, causal_mask, embed, final_norm, lm_logits,
                        module_state, position_embeddings, run_layer, torch_linears)
from .model_source import LINEAR_NAMES, ModelSource
from .plan import UNITS, Plan, allocate, part_bytes
from .quantize import QuantScheme, stored_bytes

QUANTIZED = ("int8", "int4")
# What gets a precision of its own: each layer's attention and MLP halves, or each stored linear
# (qkv, o, gate_up, down: twice the measurements, finer choices for the knapsack).
GRANULARITY = {"block": ("attn", "mlp"), "linear": PARTS}


@dataclass
class Sensitivity:
    """KL cost of each part at each precision (FP16 everywhere else) and the bytes it takes."""
    cost: dict[str, list[dict[str, float]]]     # unit -> per layer {precision: mean KL}
    tokens: int
    seconds: float
    params: dict = field(default_factory=dict)
    # the token tables' costs, when measured: "embed_tokens" (a tied model's one table, which
    # the head reads too) and "lm_head" (untied) -> {precision: mean KL}
    tables: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.cost)

    def layer_importance(self) -> list[float]:
        """One number per layer for the `scores` record: the KL cost of INT4 on the whole layer."""
        L = len(next(iter(self.cost.values())))
        return [sum(self.cost[u][i]["int4"] for u in self.units) for i in range(L)]

    def to_json(self) -> dict:
        return {"cost": self.cost, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                **({"tables": self.tables} if self.tables else {}), **self.params}


def table_units(spec, source: ModelSource | None = None) -> tuple[str, ...]:
    """The token tables that get a precision of their own: one for a tied model (the embedding
    is the head), two otherwise."""
    tied = spec.tie_word_embeddings or (source is not None and not source.has_tensor(LM_HEAD))
    return ("embed_tokens",) if tied else ("embed_tokens", "lm_head")


class KLMeter:
    """Mean KL(FP16 || plan) of next-token distributions over fixed calibration windows."""

    def __init__(self, source: ModelSource, windows: np.ndarray, schemes: dict[str, QuantScheme],
                 act_stats: dict | None = None, batch_size: int = 4, device: str = "cpu"):
        spec = self.spec = source.spec
        # device: where the layers run (float32 everywhere; the meter holds the whole model, so
        # a GPU only suits the models whose float32 copy and candidates fit on it)
        from .devices import _device

        dev = self.device = _device(device)
        self.source, self.schemes, self.act_stats = source, schemes, act_stats or {}
        self.batch_size = batch_size
        config = spec.to_hf_config()
        config._attn_implementation = "sdpa"
        layer_cls, _ = _classes(spec.architecture)
        ids = torch.from_numpy(np.asarray(windows, dtype=np.int64))
        self.n, self.seq_len = ids.shape
        self.tokens = self.n * (self.seq_len - 1)
        f16 = lambda a: torch.from_numpy(np.asarray(a, np.float32).astype(np.float16)).float()  # noqa: E731
        table = f16(source.embedding())
        if int(ids.max()) >= table.shape[0]:
            raise LsaqError(f"calibration token id {int(ids.max())} is outside the model's "
                            f"{table.shape[0]}-row embedding")
        self.tied = spec.tie_word_embeddings or not source.has_tensor(LM_HEAD)
        self.table = table.to(dev)
        self.head = self.table if self.tied else f16(source.tensor(LM_HEAD)).to(dev)
        self._tables: dict[tuple[str, str], torch.Tensor] = {}
        self.norm = as_tensor(np.asarray(source.tensor(FINAL_NORM), np.float32)).to(dev)
        self.positions = torch.arange(self.seq_len)[None]
        self.rotary = position_embeddings(spec, config, table[:1][None], self.positions)
        if dev.type != "cpu":
            self.positions = self.positions.to(dev)
            self.rotary = [{k: tuple(t.to(dev) for t in v) for k, v in r.items()}
                           for r in self.rotary]
        self.layers, self.masks, self.fp16 = [], [], []
        # transformers' linear modules of a layer and the Llama-style linears each stacks
        self.modules = torch_linears(spec)
        linear = {f"{n}.weight" for n in LINEAR_NAMES}
        for i in range(spec.num_layers):
            tensors = source.layer_tensors(i)
            state = {k: (f16(v) if k in linear else as_tensor(np.asarray(v, np.float32)))
                     for k, v in tensors.items()}
            with torch.device("meta"):
                layer = layer_cls(config, i)
            layer.load_state_dict(module_state(spec, state), strict=True, assign=True)
            self.layers.append(layer.eval().to(dev))
            self.fp16.append({m: layer.get_submodule(m).weight.data for m in self.modules})
            self.masks.append(causal_mask(self.seq_len, spec.layer_window(i)).to(dev))
        self._weights: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        # The FP16 model's input to every layer and its output distribution: each measurement
        # starts at the first layer it changes and compares against these.
        self.ids = ids = ids.to(dev)
        with torch.no_grad():
            h = embed(spec, self.table, ids)
            self.inputs = [h]
            for i in range(spec.num_layers):
                h = self._layer(i, h)
                self.inputs.append(h)
            self.ref_logp = [torch.log_softmax(self._logits(h[b:b + 1]), -1)
                             for b in range(self.n)]
            self.ref_p = [lp.exp() for lp in self.ref_logp]

    def _layer(self, i: int, h: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(h)
        for b in range(0, self.n, self.batch_size):
            out[b:b + self.batch_size] = run_layer(self.layers[i], h[b:b + self.batch_size],
                                                   self.masks[i], self.positions, self.rotary[i])
        return out

    def _logits(self, h: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        # The last position predicts nothing inside the window.
        return lm_logits(self.spec, final_norm(self.spec, h[:, :-1], self.norm),
                         self.head if head is None else head)

    def _table(self, which: str, precision: str) -> torch.Tensor:
        """A token table ("embed_tokens" or "lm_head") as a graph at `precision` computes with
        it. Only the latest quantized table is kept (a 262k-row table is 0.7 GB in float32)."""
        fp16 = self.table if which == "embed_tokens" else self.head
        if precision == "fp16":
            return fp16
        if (which, precision) not in self._tables:
            self._tables.clear()
            w = table_weight(fp16.cpu().numpy(), precision, self.schemes)
            self._tables[(which, precision)] = torch.from_numpy(np.ascontiguousarray(w)).to(
                self.device)
        return self._tables[(which, precision)]

    def _weight(self, i: int, module: str, precision: str) -> torch.Tensor:
        """The weight of transformers' linear module `module` of layer i at `precision`."""
        if precision == "fp16":
            return self.fp16[i][module]
        if (i, precision) not in self._weights:  # the whole layer at once: one read of its tensors
            tensors = self.source.layer_tensors(i)
            out = {}
            for mod, members in self.modules.items():
                ws = []
                for n in members:
                    act = self.act_stats.get(_stats_key(i, n))
                    kw = {"act": act} if act is not None else {}
                    ws.append(effective_linear_weight(tensors[f"{n}.weight"], precision,
                                                      self.schemes, **kw))
                out[mod] = torch.from_numpy(np.ascontiguousarray(np.concatenate(ws),
                                                                 dtype=np.float32)).to(self.device)
            self._weights[(i, precision)] = out
        return self._weights[(i, precision)][module]

    def _set(self, i: int, layer_precision: str) -> None:
        mods = dict(self.layers[i].named_modules())
        for mod in self.modules:
            # a fused module's members share one stored linear, hence one precision
            mods[mod].weight.data = self._weight(i, mod, part_precision(layer_precision, mod))

    def kl(self, precisions: list[str] | tuple[str, ...], tables: dict[str, str] | None = None
           ) -> float:
        """Mean KL(FP16 || plan) per predicted token. tables: the embedding table's and (untied)
        the LM head's precision, fp16 when left out; a tied model's head follows the table."""
        L = self.spec.num_layers
        if len(precisions) != L:
            raise LsaqError(f"{len(precisions)} precisions for {L} layers")
        tables = tables or {}
        embed_p = tables.get("embed_tokens", "fp16")
        head_p = embed_p if self.tied else tables.get("lm_head", "fp16")
        changed = [i for i, p in enumerate(precisions) if p != "fp16"]
        if not changed and embed_p == head_p == "fp16":
            return 0.0
        total = 0.0
        with torch.no_grad():
            if embed_p != "fp16":   # every layer sees other inputs
                first, h = 0, embed(self.spec, self._table("embed_tokens", embed_p), self.ids)
            else:
                first = changed[0] if changed else L
                h = self.inputs[first]
            try:
                for i in range(first, L):
                    self._set(i, precisions[i])
                    h = self._layer(i, h)
            finally:
                for i in changed:
                    self._set(i, "fp16")
            head = self._table("embed_tokens" if self.tied else "lm_head", head_p)
            for b in range(self.n):
                lq = torch.log_softmax(self._logits(h[b:b + 1], head), -1)
                total += float((self.ref_p[b] * (self.ref_logp[b] - lq)).sum())
        return total / self.tokens


def _stats_key(i: int, name: str) -> str:
    """Activation-statistics key of an HF linear: the stored (fused) linear that holds it."""
    return act_key(i, STORED_OF[name.rsplit(".", 1)[-1]])


def _layer_precision(unit_precisions: dict[str, str]) -> str:
    """The layer precision whose units (see plan.UNITS) have these precisions."""
    parts = {LINEAR_PART[lin]: p for u, p in unit_precisions.items() for lin in UNITS[u]}
    return join_precision(parts)


def part_plan(L: int, layer: int, unit: str, precision: str) -> list[str]:
    """FP16 everywhere but one unit (plan.UNITS: "attn", "mlp" or one linear) of one layer."""
    p = ["fp16"] * L
    units = GRANULARITY["linear" if unit in PARTS else "block"]
    p[layer] = _layer_precision({u: precision if u == unit else "fp16" for u in units})
    return p


def measure(meter: KLMeter, precisions=QUANTIZED, units: tuple[str, ...] = GRANULARITY["block"],
            progress: Callable[[str], None] | None = None, tables: bool = False,
            known: dict | None = None, record: Callable[[tuple, dict], None] | None = None
            ) -> Sensitivity:
    """Single-unit costs: units x layers x precisions KL measurements, and with `tables` the
    embedding table's and LM head's at each precision (a full pass each for the embedding, a
    cheap one for an untied head). known: costs already measured, by ("table", name) or
    ("layer", i, unit) (a resumed build's); record: called with each new one as it finishes."""
    L = meter.spec.num_layers
    t0 = time.perf_counter()
    known = known or {}
    cost = {part: [dict() for _ in range(L)] for part in units}
    table_cost = {t: {} for t in (table_units(meter.spec, meter.source) if tables else ())}
    n, done = len(units) * L * len(precisions) + len(table_cost) * len(precisions), 0

    def one(key: tuple, plan: Callable[[str], float]) -> dict[str, float]:
        nonlocal done
        if key in known and set(precisions) <= set(known[key]):
            done += len(precisions)
            return {p: known[key][p] for p in precisions}
        got = {p: plan(p) for p in precisions}
        done += len(precisions)
        if record:
            record(key, got)
        return got

    for t in table_cost:
        table_cost[t] = one(("table", t), lambda p: meter.kl(["fp16"] * L, {t: p}))
        if progress:
            progress(f"{t} table: " + ", ".join(f"{p} {table_cost[t][p]:.2e}" for p in precisions)
                     + f" ({done}/{n}, {time.perf_counter() - t0:.0f}s)")
    for i in range(L):
        for part in units:
            cost[part][i] = one(("layer", i, part), lambda p: meter.kl(part_plan(L, i, part, p)))
            if progress:
                progress(f"layer {i + 1}/{L} {part}: " + ", ".join(
                    f"{p} {cost[part][i][p]:.2e}" for p in precisions)
                    + f" ({done}/{n}, {time.perf_counter() - t0:.0f}s{_eta(t0, done, n, i, L)})")
    return Sensitivity(cost, meter.tokens, time.perf_counter() - t0, tables=table_cost)


def _eta(t0: float, done: int, n: int, layer: int, L: int) -> str:
    """", 12.0 measurements/min, about 4m10s left": a measurement of layer i runs L - i layers,
    so the work left is weighed by the layers each remaining one runs, at the rate so far."""
    from .devices import _clock

    spent = time.perf_counter() - t0
    if not done or done >= n:
        return ""
    # work ~ sum over measured layers of (L - i) per measurement; the tables' passes aside
    did = sum(L - j for j in range(layer + 1))
    left = sum(L - j for j in range(layer + 1, L))
    return (f", {60 * done / max(spent, 1e-9):.1f} measurements/min, about "
            f"{_clock(spent * left / max(did, 1))} left")


@dataclass
class Rung:
    """One ladder plan chosen for a byte budget, with what it measured."""
    budget: int
    plan: Plan
    bytes: int
    predicted: float        # additive model: summed single-part costs
    measured: float         # KL of the whole plan
    refined: int = 0        # swaps the greedy refinement kept


def _part(layer_precision: str, unit: str) -> str:
    """The precision of one unit of a layer (of its first linear: a plan chosen at a unit's
    granularity gives all of its linears one precision)."""
    return part_precision(layer_precision, UNITS[unit][0])


def plan_costs(sens: Sensitivity, precisions: list[str], tables: dict | None = None) -> float:
    total = 0.0
    for i, p in enumerate(precisions):
        for part in sens.units:
            q = _part(p, part)
            total += sens.cost[part][i].get(q, 0.0)
    for t, p in (tables or {}).items():
        total += sens.tables.get(t, {}).get(p, 0.0)
    return total


def _items(sens: Sensitivity, sizes: list[dict[str, dict[str, int]]],
           table_sizes: dict[str, dict[str, int]] | None = None, choices=QUANTIZED):
    """Knapsack items in (layer, part) order, then the token tables: cost and bytes of each
    precision choice."""
    costs, weights = [], []
    for i, layer in enumerate(sizes):
        for part in sens.units:
            costs.append({p: sens.cost[part][i][p] for p in choices})
            weights.append({p: layer[part][p] for p in choices})
    for t, size in (table_sizes or {}).items():
        # a table may also stay fp16 (no cost): between all-INT8 and FP16 a large-vocabulary
        # model has a useful variant with INT8 linears and an exact table
        costs.append({"fp16": 0.0, **{p: sens.tables[t][p] for p in choices}})
        weights.append({p: size[p] for p in ("fp16", *choices)})
    return costs, weights


def _decode(choice: list[str], L: int, units: tuple[str, ...], tables: tuple[str, ...] = ()
            ) -> tuple[tuple[str, ...], dict[str, str]]:
    """(layer precisions, table precisions) of a knapsack choice: one precision per (layer,
    unit) in that order, then one per token table."""
    u = len(units)
    prec = tuple(_layer_precision(dict(zip(units, choice[u * i:u * i + u]))) for i in range(L))
    return prec, dict(zip(tables, choice[u * L:]))


def _plan_bytes(precisions, sizes, tables: dict | None = None, table_sizes: dict | None = None
                ) -> int:
    return (sum(sizes[i][unit][_part(p, unit)] for i, p in enumerate(precisions)
                for unit in sizes[i])
            + sum(table_sizes[t][p] for t, p in (tables or {}).items()))


def _plan(name: str, prec, tables: dict) -> Plan:
    return Plan(name, prec, tuple(sorted(tables.items())))


def allocate_rungs(meter: KLMeter, sens: Sensitivity, sizes: list[dict[str, dict[str, int]]],
                   budgets: list[tuple[str, int]], refine: int = 2,
                   progress: Callable[[str], None] | None = None,
                   table_sizes: dict[str, dict[str, int]] | None = None) -> list[Rung]:
    """For each (name, byte budget): the additive-model optimum, measured as a whole, then up to
    `refine` rounds of the best measured swap (one INT4 part up to INT8 and one INT8 part down,
    bytes still within budget; candidates ranked by the additive model). table_sizes: the
    token tables on the ladder and their bytes at each precision (they are items like the
    linears; budgets then count them)."""
    if hasattr(meter, "kl_many"):   # a streamed meter: each round's plans in one pass
        return allocate_rungs_batched(sens, sizes, budgets, meter.kl_many, refine, table_sizes,
                                      progress)
    L = meter.spec.num_layers
    tabs = tuple(table_sizes or ())
    costs, weights = _items(sens, sizes, table_sizes)
    choices = allocate(costs, weights, [b for _, b in budgets])
    rungs = []

    def rung_of(name, budget, choice, measured, refined=0) -> Rung:
        prec, tables = _decode(choice, L, sens.units, tabs)
        return Rung(budget, _plan(name, prec, tables),
                    _plan_bytes(prec, sizes, tables, table_sizes), plan_costs(sens, prec, tables),
                    measured, refined)

    def kl_of(choice) -> float:
        return meter.kl(*_decode(choice, L, sens.units, tabs))

    for (name, budget), choice in zip(budgets, choices):
        rung = rung_of(name, budget, choice, kl_of(choice))
        for _ in range(refine):
            best = None
            for cand in _swaps(choice, costs, weights, budget, limit=3):
                kl = kl_of(cand)
                if kl < rung.measured and (best is None or kl < best[1]):
                    best = (cand, kl)
            if best is None:
                break
            choice = best[0]
            rung = rung_of(name, budget, choice, best[1], rung.refined + 1)
        if progress:
            progress(f"{name}: {rung.bytes / 2**20:.1f} MiB of quantized weights, KL "
                     f"{rung.measured:.4f} measured / {rung.predicted:.4f} additive"
                     + (f", {rung.refined} swap(s) kept" if rung.refined else ""))
        rungs.append(rung)
    return rungs


def allocate_rungs_batched(sens: Sensitivity, sizes: list[dict[str, dict[str, int]]],
                   budgets: list[tuple[str, int]], kl_many: Callable[[list], list[float]],
                   refine: int = 1, table_sizes: dict | None = None,
                   progress: Callable[[str], None] | None = None) -> list:
    """allocate_rungs with every whole-plan measurement of a round batched into one
    call of kl_many(plans) -> KLs (plans as (layer precisions, tables); e.g. plans_kl: one
    streamed pass a round): the knapsack's plan of every budget in the first, then per
    refinement round the candidate swaps of every budget still improving. Same rungs as
    sensitivity.allocate_rungs given the same KLs; its cost is (1 + refine) streamed passes
    whatever the number of rungs."""
    L = len(sizes)
    tabs = tuple(table_sizes or ())
    costs, weights = _items(sens, sizes, table_sizes)
    choices = allocate(costs, weights, [b for _, b in budgets])

    def rung(name, budget, choice, kl, refined=0):
        prec, tables = _decode(choice, L, sens.units, tabs)
        return Rung(budget, _plan(name, prec, tables),
                    _plan_bytes(prec, sizes, tables, table_sizes), plan_costs(sens, prec, tables),
                    kl, refined)

    kls = kl_many([_decode(c, L, sens.units, tabs) for c in choices])
    rungs = [rung(name, b, c, k) for (name, b), c, k in zip(budgets, choices, kls)]
    live = list(range(len(rungs)))
    for _ in range(refine):
        cands = {r: _swaps(choices[r], costs, weights, rungs[r].budget, limit=3) for r in live}
        flat = [(r, c) for r in live for c in cands[r]]
        if not flat:
            break
        got = kl_many([_decode(c, L, sens.units, tabs) for _, c in flat])
        best: dict[int, tuple] = {}
        for (r, c), kl in zip(flat, got):
            if kl < rungs[r].measured and (r not in best or kl < best[r][1]):
                best[r] = (c, kl)
        for r, (c, kl) in best.items():
            choices[r] = c
            rungs[r] = rung(rungs[r].plan.name, rungs[r].budget, c, kl, rungs[r].refined + 1)
        live = list(best)
    if progress:
        for r in rungs:
            progress(f"{r.plan.name}: {r.bytes / 2**20:.1f} MiB of quantized weights, KL "
                     f"{r.measured:.4f} measured / {r.predicted:.4f} additive"
                     + (f", {r.refined} swap(s) kept" if r.refined else ""))
    return rungs


def _swaps(choice: list[str], costs, weights, budget: int, limit: int) -> list[list[str]]:
    """The `limit` byte-neutral-or-cheaper swaps the additive model rates best."""
    used = sum(w[c] for w, c in zip(weights, choice))
    up = [j for j, c in enumerate(choice) if c == "int4"]
    down = [j for j, c in enumerate(choice) if c == "int8"]
    cands = []
    for a in up:
        for b in down:
            extra = (weights[a]["int8"] - weights[a]["int4"]) - (weights[b]["int8"] - weights[b]["int4"])
            if used + extra > budget:
                continue
            delta = (costs[a]["int8"] - costs[a]["int4"]) + (costs[b]["int4"] - costs[b]["int8"])
            cands.append((delta, a, b))
    cands.sort()
    out = []
    for _, a, b in cands[:limit]:
        c = list(choice)
        c[a], c[b] = "int8", "int4"
        out.append(c)
    return out


def additive_fit(rungs: list[Rung]) -> dict:
    """How well summed single-part costs predict whole-plan KL: least-squares slope through the
    origin and the worst ratio."""
    pts = [(r.predicted, r.measured) for r in rungs if r.predicted > 0]
    if not pts:
        return {}
    slope = sum(p * m for p, m in pts) / sum(p * p for p, _ in pts)
    ratios = [m / p for p, m in pts]
    return {"slope": round(slope, 4), "min_ratio": round(min(ratios), 4),
            "max_ratio": round(max(ratios), 4), "plans": len(pts)}


def table_sizes(spec, schemes: dict[str, QuantScheme], tables: tuple[str, ...]
                ) -> dict[str, dict[str, int]]:
    """Stored bytes of each token table at fp16, int8 and int4 (scales included)."""
    n = spec.vocab_size * spec.hidden_size
    return {t: {"fp16": 2 * n, **{p: stored_bytes(spec.vocab_size, spec.hidden_size,
                                                   table_scheme(schemes, p)) for p in QUANTIZED}}
            for t in tables}


def layer_part_sizes(spec, schemes: dict[str, QuantScheme], units=GRANULARITY["block"],
                     precisions=("fp16",) + QUANTIZED) -> list[dict[str, dict[str, int]]]:
    """Stored bytes of each layer's units at each precision (scales included)."""
    one = {u: {p: part_bytes(spec, u, p, schemes) for p in precisions} for u in units}
    return [one for _ in range(spec.num_layers)]


def check_finite(sens: Sensitivity) -> None:
    bad = [(part, i) for part in sens.units for i, c in enumerate(sens.cost[part])
           if not all(math.isfinite(v) for v in c.values())]
    if bad:
        raise LsaqError(f"sensitivity: non-finite KL for {bad[:3]}; the weights hold NaN/inf "
                        "or the hidden states overflowed — check the model files")


# ---------------------------------------------------------------- scoring and the ladder
def score(source: ModelSource, calibration, windows: np.ndarray, schemes: dict[str, QuantScheme],
          act_stats: dict | None = None, progress: Callable[[str], None] | None = None,
          granularity: str = "block", tables: bool = False, log=None, device: str = "cpu"):
    """Measure every unit's sensitivity (GRANULARITY: "block" = attention and MLP, "linear" =
    each stored linear; with `tables` the embedding table and LM head too); return (Scores with
    metric "sensitivity", the meter). log: a job.MeasurementLog to continue and append to."""
    if granularity not in GRANULARITY:
        raise LsaqError(f"sensitivity granularity {granularity!r}: use "
                        f"{' or '.join(map(repr, GRANULARITY))}")
    from .importance import Scores

    known = {}   # a resumed build's finished measurements (refused first if of other inputs)
    if log is not None:
        log.start()
        known = log.read()
        if known and progress:
            progress(f"resuming: reusing {len(known)} finished (layer, unit) measurements from "
                     f"{log.path}")
    t0 = time.perf_counter()
    meter = KLMeter(source, windows, schemes, act_stats, device=device)
    if progress:
        progress(f"FP16 reference on {meter.n} x {meter.seq_len} tokens "
                 f"({time.perf_counter() - t0:.0f}s)")
    sens = measure(meter, units=GRANULARITY[granularity], progress=progress, tables=tables,
                   known=known, record=log.append if log is not None else None)
    check_finite(sens)
    spec = source.spec
    model = {"name": spec.name, "architecture": spec.architecture, "num_layers": spec.num_layers,
             "fingerprint": source.fingerprint()}
    calib = {"source": calibration.source, "sha256": calibration.sha256,
             "samples": int(len(windows)), "seq_len": int(meter.seq_len)}
    params = {"int8": schemes["int8"].name, "int4": schemes["int4"].name, **sens.to_json()}
    return Scores(metric="sensitivity", params=params, calibration=calib, model=model,
                  importance=sens.layer_importance()), meter


def from_scores(scores, schemes: dict[str, QuantScheme]) -> Sensitivity:
    """The measured costs inside sensitivity Scores, checked against the schemes to build."""
    p = scores.params
    L = len(scores.importance)
    for prec in QUANTIZED:
        if p.get(prec) != schemes[prec].name:
            raise LsaqError(f"these sensitivity scores measured {prec.upper()} as {p.get(prec)!r}, "
                            f"but the profile quantizes it as {schemes[prec].name!r}; score again "
                            "with this profile")
    cost = p.get("cost")
    units = tuple(cost) if isinstance(cost, dict) else ()
    ok = units in GRANULARITY.values() and all(
        isinstance(cost.get(part), list) and len(cost[part]) == L and all(
            isinstance(c, dict) and all(isinstance(c.get(q), (int, float)) and
                                        math.isfinite(c[q]) and c[q] >= 0 for q in QUANTIZED)
            for c in cost[part]) for part in units)
    if not ok:
        raise LsaqError("sensitivity scores lack per-part costs (params.cost); score again with "
                        "`lsaq-compile score --metric sensitivity`")
    tables = p.get("tables") or {}
    if not (isinstance(tables, dict) and set(tables) <= {"embed_tokens", "lm_head"} and all(
            isinstance(c, dict) and all(isinstance(c.get(q), (int, float)) and
                                        math.isfinite(c[q]) and c[q] >= 0 for q in QUANTIZED)
            for c in tables.values())):
        raise LsaqError("sensitivity scores hold malformed token-table costs (params.tables); "
                        "score again with `lsaq-compile score --metric sensitivity`")
    return Sensitivity({part: [dict(c) for c in cost[part]] for part in units},
                       int(p.get("tokens", 0)), float(p.get("seconds", 0.0)),
                       tables={t: dict(c) for t, c in tables.items()})


def ladder_plans(meter: KLMeter, sens: Sensitivity, schemes: dict[str, QuantScheme], kind: str,
                 rungs: int = 8, refine: int = 2, progress: Callable[[str], None] | None = None,
                 rung_bits: list[float] = (), tables: bool = False
                 ) -> tuple[list[Plan], dict[str, float], dict]:
    """FP16, then quantized plans most bytes first. kind "bytes": `rungs` + 1 budgets evenly
    spaced from all-INT4 to all-INT8 bytes, plus one at each of `rung_bits` (average bits per
    quantized weight, scales included); "paper": the bytes of INT4 on 25/50/75% of the layers
    (each plan named after the mix whose bytes it uses). With `tables` (kind "bytes") the
    embedding table and LM head are items of the allocation like the linears (INT8 or INT4 by
    their measured cost) and the budgets and bits count them: on a large-vocabulary model they
    are most of the bytes. Returns the plans, each quantized plan's measured KL, and the
    additive model's fit."""
    from .plan import avg_bits_real, byte_budgets, mix_plan, paper_counts, part_params

    spec = meter.spec
    L = spec.num_layers
    sizes = layer_part_sizes(spec, schemes, sens.units)
    layer = {p: sum(sizes[0][u][p] for u in sens.units) for p in QUANTIZED}
    params = L * sum(part_params(spec).values())
    tsizes = None
    if tables and kind == "bytes":
        missing = set(table_units(spec, meter.source)) - set(sens.tables)
        if missing:
            raise LsaqError(f"these sensitivity scores do not measure the {', '.join(sorted(missing))} "
                            "table, but the profile puts the token tables on the ladder "
                            "(quantization.tables = \"ladder\"); score again with this profile "
                            "or set tables = \"fp16\"")
        tsizes = table_sizes(spec, schemes, table_units(spec, meter.source))
        params += len(tsizes) * spec.vocab_size * spec.hidden_size
    tbytes = {p: sum(t[p] for t in (tsizes or {}).values()) for p in ("fp16", *QUANTIZED)}
    if kind == "bytes":
        low, high = L * layer["int4"] + tbytes["int4"], L * layer["int8"] + tbytes["int8"]
        budgets = [(f"r{r}", b) for r, b in enumerate(byte_budgets(low, high, rungs))]
        if tsizes:   # one more: the bytes of INT8 linears with fp16 tables
            budgets.append(("t16", L * layer["int8"] + tbytes["fp16"]))
        what = "quantized weight (decoder linears and token tables)" if tsizes else \
            "decoder-linear weight"
        for bits in rung_bits:
            b = math.floor(bits * params / 8)
            if not low <= b <= high:
                raise LsaqError(f"build.rung_bits {bits}: this model's quantized variants take "
                                f"{8 * low / params:.3f} (all INT4) to {8 * high / params:.3f} "
                                f"(all INT8) bits per {what}; pick a value in that range")
            budgets.append((f"b{bits}", b))
    elif kind == "paper":
        counts = [0] + sorted(set(c for c in paper_counts(L) if 0 < c < L)) + [L]
        budgets = [(mix_plan(list(range(L)), n).name, n * layer["int4"] + (L - n) * layer["int8"])
                   for n in counts]
    else:
        raise LsaqError(f"ladder {kind!r} is not allocated by sensitivity; use 'bytes' or 'paper'")
    budgets.sort(key=lambda nb: -nb[1])  # most bytes first, the order the bundle lists them
    found = allocate_rungs(meter, sens, sizes, budgets, refine=refine, progress=progress,
                           table_sizes=tsizes)
    plans, kl, seen = [Plan("fp16", ("fp16",) * L)], {}, set()
    for r in found:
        key = (r.plan.precisions, r.plan.tables)
        if key in seen:  # two budgets that chose the same plan ship it once
            continue
        seen.add(key)
        name = r.plan.name
        if kind == "bytes":
            c, tp = r.plan.counts, set(dict(r.plan.tables).values())
            name = ("int8" if c["int8"] == L and tp <= {"int8"} else
                    "int4" if c["int4"] == L and tp <= {"int4"} else
                    f"mix{avg_bits_real([r.bytes], [params]):.2f}")
        if name in kl:  # two rungs whose bits round alike
            name = f"{name}-{len(plans)}"
        plans.append(Plan(name, r.plan.precisions, r.plan.tables))
        kl[name] = r.measured
    return plans, kl, additive_fit(found)
