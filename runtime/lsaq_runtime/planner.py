"""Choose the variant to load: the best one (most precise, or best measured quality) whose
memory need fits the free memory.

need = predicted + margin, with predicted = resident weights + runtime overhead (the tokenizer
included on CPU) + the larger of (KV cache for the requested context + workspace) and the
session's creation-time copies (BUNDLE_FORMAT.md). The KV cache is one buffer of exactly
`context` tokens shared by past and present (see session.py), so it is counted once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .errors import LsaqRuntimeError, NoVariantFits
from .manifest import (TABLES, kv_bytes_per_token, split_precision, tokenizer_bytes,
                       workspace_bytes)
from .probe import Device
from .sizes import format_size

# Floors under the manifest's deployment numbers, so a manifest cannot plan with less than the
# runtime is sure to take: the interpreter, ONNX Runtime and the tokenizer hold 88 MiB on CPU
# (benchmarks/bench_memory.py; about half is the floor), a CUDA context far more; and a margin
# of at least 5% (8 MiB) for the allocator's slack. A manifest may say more, never less.
MIN_OVERHEAD_BYTES = {"cpu": 48 << 20, "cuda": 128 << 20}
MIN_MARGIN_FRACTION = 0.05
MIN_MARGIN_BYTES = 8 << 20


@dataclass
class Row:
    name: str
    rank: int
    layer_counts: dict
    avg_bits: float
    perplexity: float | None = None   # measured at build time (held-out calibration text)
    kl_fp16: float | None = None      # KL from the FP16 variant on the same windows
    resident_bytes: int = 0
    kv_bytes: int = 0
    workspace_bytes: int = 0
    overhead_bytes: int = 0      # runtime (interpreter, ONNX Runtime) and the tokenizer
    creation_bytes: int = 0      # transient while the session is created (see estimate)
    predicted_bytes: int = 0     # need without the safety margin
    margin_bytes: int = 0
    need_bytes: int | None = None  # None: no graph for this provider
    fits: bool = False
    chosen: bool = False


@dataclass
class Decision:
    device: Device
    provider: str                # "cpu" | "cuda": which graph of the variant is loaded
    context: int
    batch: int
    free_bytes: int              # what the plan compared against (budget applied)
    budget_bytes: int | None
    rows: list[Row]
    chosen: str | None
    reason: str
    forced: bool = False
    notes: list[str] = field(default_factory=list)
    manifest: dict = field(default=None, repr=False)

    @property
    def chosen_row(self) -> Row | None:
        return next((r for r in self.rows if r.chosen), None)

    @property
    def smallest_need(self) -> int | None:
        needs = [r.need_bytes for r in self.rows if r.need_bytes is not None]
        return min(needs) if needs else None

    def to_json(self) -> dict:
        return {"device": self.device.to_json(), "provider": self.provider, "context": self.context,
                "batch": self.batch, "free_bytes": self.free_bytes, "budget_bytes": self.budget_bytes,
                "chosen": self.chosen, "reason": self.reason, "forced": self.forced,
                "notes": self.notes, "variants": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        head = ("", "variant", "fp16", "int8", "int4", "mixed", "avg bits", "KL", "ppl", "need",
                "fits")
        lines = [head]
        for r in self.rows:
            c = r.layer_counts
            need = format_size(r.need_bytes) if r.need_bytes is not None else f"no {self.provider} graph"
            ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
            kl = f"{r.kl_fp16:.4f}" if r.kl_fp16 is not None else "-"
            lines.append(("*" if r.chosen else "", r.name, str(c["fp16"]), str(c["int8"]), str(c["int4"]),
                          str(c.get("mixed", 0)), f"{r.avg_bits:.2f}", kl, ppl, need,
                          "yes" if r.fits else "no"))
        widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
        right = {2, 3, 4, 5, 6, 7, 8, 9}
        out = ["  ".join(s.rjust(w) if i in right else s.ljust(w)
                         for i, (s, w) in enumerate(zip(l, widths))).rstrip() for l in lines]
        budget = f" (budget {format_size(self.budget_bytes)})" if self.budget_bytes is not None else ""
        out.insert(0, f"device {self.device.describe()}{budget}; planning with "
                      f"{format_size(self.free_bytes)} free, {self.provider} graphs, "
                      f"context {self.context}, batch {self.batch}")
        out.append(self.reason)
        return "\n".join(out + [f"note: {n}" for n in self.notes])


_RANK = {"int4": 0, "int8": 1, "fp16": 2}


def precision_vector(v: dict) -> tuple[int, ...]:
    """How precise each stored part of a variant is (0 int4, 1 int8, 2 fp16): every decoder
    linear of every layer, then the embedding table and the LM head (fp16 when not listed)."""
    out = [_RANK[p] for lp in v["precisions"] for p in split_precision(lp).values()]
    tables = v.get("tables") or {}
    out += [_RANK[tables.get(t, "fp16")] for t in TABLES]
    return tuple(out)


def dominates(a: dict, b: dict) -> bool:
    """a is at least as precise as b in every part (a quantizes nothing b keeps finer)."""
    return all(x >= y for x, y in zip(precision_vector(a), precision_vector(b)))


def precision_key(v: dict) -> tuple:
    """Most precise first: more FP16 layers, then more real bits (bytes stored per decoder
    weight), then more INT8 layers, then finer embedding table and head."""
    c = v["layer_counts"]
    tables = sum(precision_vector(v)[-len(TABLES):])
    return (-c["fp16"], -float(v["avg_bits"]), -c["int8"], c["int4"], -tables)


def measured(v: dict, rank_by: str) -> float:
    """The build's measured quality of a variant, lower is better: KL from the FP16 variant
    (rank_by kl_fp16) or perplexity (measured_quality) on held-out calibration windows."""
    q = v["quality"]
    return float(q["kl_fp16"] if rank_by == "kl_fp16" else q["perplexity"])


def quality_order(variants: list[dict], rank_by: str) -> list[dict]:
    """Best measured quality first, but never a variant above one that is at least as precise
    in every part: measurement noise (or a broken baseline: perplexity can *fall* under
    quantization noise) must not make the runtime load a strictly coarser variant while a finer
    one fits. Each variant is ranked by the best measurement among itself and the variants it
    dominates (an isotonic bound), ties to the more precise."""
    score = {id(v): min(measured(u, rank_by) for u in variants if dominates(v, u))
             for v in variants}
    return sorted(variants, key=lambda v: (score[id(v)],) + precision_key(v))


def quality_key(v: dict) -> tuple:
    """Best measured perplexity first, ties to the more precise variant (no dominance rule:
    use quality_order to rank a whole bundle)."""
    return (float(v["quality"]["perplexity"]),) + precision_key(v)


def ranking(manifest: dict) -> str:
    return manifest["deployment"].get("rank_by", "precision")


def ordered_variants(manifest: dict) -> tuple[list[dict], list[str]]:
    """Variants best first: by measured quality when the bundle measured every variant
    (deployment.rank_by kl_fp16 or measured_quality), else most precise first; either way never
    a variant above one that dominates it. Manifest order is the contract, but a hand-edited or
    buggy manifest must not make the runtime pick a worse variant than one that fits."""
    listed = list(manifest["variants"])
    rank_by = ranking(manifest)
    if rank_by in ("kl_fp16", "measured_quality"):
        ordered = quality_order(listed, rank_by)
    else:
        ordered = sorted(listed, key=precision_key)  # stable
    notes = []
    if [v["name"] for v in ordered] != [v["name"] for v in listed]:
        what = "most precise" if rank_by == "precision" else "best measured quality"
        notes.append(f"manifest variants were not listed {what} first; sorted that way (a "
                     "variant at least as precise in every part before the others)")
    return ordered, notes


def resolve_context(manifest: dict, context: int | None) -> int:
    cap = manifest["model"]["max_context"]
    if context is None:  # the profile's assumption, but never past what the graphs support
        return min(manifest["deployment"]["context_length"], cap)
    ctx = int(context)
    if ctx < 1:
        raise LsaqRuntimeError(f"--context must be at least 1 (got {ctx})")
    if ctx > cap:
        raise LsaqRuntimeError(f"--context {ctx} is larger than this bundle's max_context {cap} "
                               "(the rotary cache built into its graphs); use --context "
                               f"{cap} or less, or rebuild with a larger build.max_context")
    return ctx


def estimate(manifest: dict, variant: dict, provider: str, context: int, batch: int) -> Row:
    """The memory need of one variant on one provider (BUNDLE_FORMAT.md formula)."""
    q = variant.get("quality")
    row = Row(variant["name"], variant.get("rank", 0), dict(variant["layer_counts"]),
              float(variant["avg_bits"]), float(q["perplexity"]) if q else None,
              float(q["kl_fp16"]) if q and "kl_fp16" in q else None)
    info = variant["providers"].get(provider)
    if info is None:
        return row
    dep = manifest["deployment"]
    ws = info["workspace"]
    row.resident_bytes = int(info["resident_bytes"])
    # From the model's shape, the same formula the KV allocation uses (and the manifest's
    # kv_bytes_per_token was checked against it).
    row.kv_bytes = kv_bytes_per_token(manifest["model"], info["dtype"]) * context * batch
    row.workspace_bytes = workspace_bytes(ws, context)
    row.overhead_bytes = max(int(dep["runtime_overhead_bytes"].get(provider, 0)),
                             MIN_OVERHEAD_BYTES.get(provider, 0))
    if provider == "cpu":   # the tokenizer lives in host memory, which a CPU plan counts
        row.overhead_bytes += tokenizer_bytes(manifest)
    row.creation_bytes = int(info.get("creation_extra_bytes", 0))
    # Session creation's transient copies are released before the KV cache and the prefill's
    # activations exist: the peak is the larger of the two.
    row.predicted_bytes = row.resident_bytes + row.overhead_bytes + max(
        row.kv_bytes + row.workspace_bytes, row.creation_bytes)
    margin = dep["safety_margin"]
    row.margin_bytes = int(max(max(margin["fraction"], MIN_MARGIN_FRACTION) * row.predicted_bytes,
                               margin["min_bytes"], MIN_MARGIN_BYTES))
    row.need_bytes = row.predicted_bytes + row.margin_bytes
    return row


def plan(manifest: dict, device: Device, context: int | None = None, batch: int | None = None,
         variant: str | None = None, budget: int | None = None, simulate: bool = False) -> Decision:
    """Decide which variant to load on `device`.

    budget: caps the free memory (simulate=False) or replaces it (simulate=True, for dry runs
    that ask "what would a device with this much memory get?")."""
    ctx = resolve_context(manifest, context)
    batch = int(batch or manifest["deployment"]["batch_size"])
    provider = "cuda" if device.kind == "cuda" else "cpu"
    free = device.free_bytes
    notes = []
    if budget is not None:
        if simulate:
            free = budget
        else:
            if budget > device.free_bytes:
                notes.append(f"budget {format_size(budget)} is more than the "
                             f"{format_size(device.free_bytes)} free on {device.label}; using what is free")
            free = min(budget, device.free_bytes)
    variants, order_notes = ordered_variants(manifest)
    notes += order_notes
    rows = [estimate(manifest, v, provider, ctx, batch) for v in variants]
    for r in rows:
        r.fits = r.need_bytes is not None and r.need_bytes <= free
    d = Decision(device, provider, ctx, batch, free, budget, rows, None, "", notes=notes,
                 manifest=manifest)

    if variant is not None:
        row = next((r for r in rows if r.name == variant), None)
        if row is None:
            raise LsaqRuntimeError(f"unknown variant {variant!r}; this bundle has: "
                                   + ", ".join(r.name for r in rows))
        if row.need_bytes is None:
            raise LsaqRuntimeError(f"variant {variant!r} has no {provider} graph in this bundle")
        if not simulate and row.need_bytes > device.total_bytes:
            raise LsaqRuntimeError(f"variant {variant!r} needs {format_size(row.need_bytes)} at "
                                   f"context {ctx}, more than all {format_size(device.total_bytes)} "
                                   f"of {device.label}; use a smaller --context or another variant")
        row.chosen, d.chosen, d.forced = True, row.name, True
        d.reason = (f"{row.name}: forced by --variant; needs {format_size(row.need_bytes)}, "
                    f"{format_size(free)} free")
        if not row.fits:
            d.reason += " — IT DOES NOT FIT and may run out of memory"
        return d

    first = next((r for r in rows if r.fits), None)
    if first is None:
        d.reason = no_fit_message(d)
        return d
    first.chosen, d.chosen = True, first.name
    better = [r for r in rows[:rows.index(first)] if r.need_bytes is not None]
    rank_by = ranking(manifest)
    if rank_by in ("kl_fp16", "measured_quality"):
        what = "KL from FP16" if rank_by == "kl_fp16" else "perplexity"
        fmt = (lambda r: f"{r.kl_fp16:.4f}") if rank_by == "kl_fp16" else \
            (lambda r: f"{r.perplexity:.3f}")
        d.reason = (f"{first.name}: the best measured quality that fits ({what} {fmt(first)} on "
                    f"held-out calibration text; needs {format_size(first.need_bytes)} of "
                    f"{format_size(free)} free)")
        if better:
            d.reason += (f"; {better[-1].name} ({fmt(better[-1])}) would need "
                         f"{format_size(better[-1].need_bytes)}")
        return d
    d.reason = (f"{first.name}: the most precise variant that fits (needs "
                f"{format_size(first.need_bytes)} of {format_size(free)} free)")
    if better:
        d.reason += f"; {better[-1].name} would need {format_size(better[-1].need_bytes)}"
    return d


def no_fit_message(d: Decision, waited: float | None = None) -> str:
    smallest = d.smallest_need
    if smallest is None:
        return f"this bundle has no {d.provider} graphs; use --device " + ("cpu" if d.provider == "cuda" else "cuda")
    row = min((r for r in d.rows if r.need_bytes is not None), key=lambda r: r.need_bytes)
    msg = (f"no variant fits: the smallest, {row.name}, needs {format_size(smallest)} at context "
           f"{d.context} but {d.device.label} has {format_size(d.free_bytes)} free")
    if waited is not None:
        msg += f" after waiting {waited:.0f}s"
    hints = []
    ctx = _largest_fitting_context(d, row)
    if ctx:
        hints.append(f"--context {ctx} or less")
    hints += ["freeing memory on the device", "--wait SECONDS to wait for it"]
    if d.budget_bytes is not None and d.budget_bytes < smallest:
        hints = ["a larger --memory-budget"] + hints[:1]
    if d.provider == "cuda":
        hints.append("--device cpu")
    return msg + "; try " + ", ".join(hints)


def _largest_fitting_context(d: Decision, row: Row) -> int | None:
    """Largest context at which `row`'s variant fits d.free_bytes (need grows with context)."""
    m, v = d.manifest, next(v for v in d.manifest["variants"] if v["name"] == row.name)
    fits = lambda c: estimate(m, v, d.provider, c, d.batch).need_bytes <= d.free_bytes  # noqa: E731
    if not fits(1):
        return None
    lo, hi = 1, d.context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def plan_or_wait(manifest: dict, probe: Callable[[], Device], wait: float = 0, *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 poll: float = 2.0, log: Callable[[str], None] | None = None, **kw) -> Decision:
    """plan(), re-probing every `poll` seconds for up to `wait` seconds until a variant fits.

    Raises NoVariantFits when nothing fits in time, or at once when waiting cannot help (the
    memory budget itself is below the smallest need)."""
    start = clock()
    d = plan(manifest, probe(), **kw)
    announced = False
    while d.chosen is None:
        waited = clock() - start
        hopeless = (d.smallest_need is None or
                    (d.budget_bytes is not None and d.budget_bytes < d.smallest_need))
        if hopeless or waited >= wait:
            raise NoVariantFits(no_fit_message(d, waited if wait else None), d)
        if log and not announced:
            log(f"waiting up to {wait:.0f}s for {format_size(d.smallest_need)} free on "
                f"{d.device.label} ({format_size(d.free_bytes)} free now)")
            announced = True
        sleep(min(poll, max(wait - waited, 0.01)))
        d = plan(manifest, probe(), **kw)
    if announced and log:
        log(f"memory freed after {clock() - start:.0f}s")
    return d


def decision_json(d: Decision) -> str:
    return json.dumps(d.to_json(), indent=1)
