"""Choose the variant to load: the most precise one whose memory need fits the free memory.

need = predicted + margin, with predicted = resident weights + KV cache for the requested context
+ workspace(context) + runtime overhead (BUNDLE_FORMAT.md). The KV cache is one buffer of exactly
`context` tokens shared by past and present (see session.py), so it is counted once.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from .errors import LsaqRuntimeError, NoVariantFits
from .manifest import kv_bytes_per_token, workspace_bytes
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
    resident_bytes: int = 0
    kv_bytes: int = 0
    workspace_bytes: int = 0
    overhead_bytes: int = 0
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
        head = ("", "variant", "fp16", "int8", "int4", "mixed", "avg bits", "ppl", "need", "fits")
        lines = [head]
        for r in self.rows:
            c = r.layer_counts
            need = format_size(r.need_bytes) if r.need_bytes is not None else f"no {self.provider} graph"
            ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
            lines.append(("*" if r.chosen else "", r.name, str(c["fp16"]), str(c["int8"]), str(c["int4"]),
                          str(c.get("mixed", 0)), f"{r.avg_bits:.2f}", ppl, need,
                          "yes" if r.fits else "no"))
        widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
        right = {2, 3, 4, 5, 6, 7, 8}
        out = ["  ".join(s.rjust(w) if i in right else s.ljust(w)
                         for i, (s, w) in enumerate(zip(l, widths))).rstrip() for l in lines]
        budget = f" (budget {format_size(self.budget_bytes)})" if self.budget_bytes is not None else ""
        out.insert(0, f"device {self.device.describe()}{budget}; planning with "
                      f"{format_size(self.free_bytes)} free, {self.provider} graphs, "
                      f"context {self.context}, batch {self.batch}")
        out.append(self.reason)
        return "\n".join(out + [f"note: {n}" for n in self.notes])


def precision_key(v: dict) -> tuple:
    """Most precise first: more FP16 layers, then more real bits (bytes stored per decoder
    weight), then more INT8 layers."""
    c = v["layer_counts"]
    return (-c["fp16"], -float(v["avg_bits"]), -c["int8"], c["int4"])


def quality_key(v: dict) -> tuple:
    """Best measured quality first: lowest perplexity on the build's held-out calibration
    windows; equal perplexities go to the more precise variant."""
    return (float(v["quality"]["perplexity"]),) + precision_key(v)


def ranking(manifest: dict) -> str:
    return manifest["deployment"].get("rank_by", "precision")


def ordered_variants(manifest: dict) -> tuple[list[dict], list[str]]:
    """Variants best first: by measured quality when the bundle measured every variant
    (deployment.rank_by = measured_quality), else most precise first. Manifest order is the
    contract, but a hand-edited or buggy manifest must not make the runtime pick a worse
    variant than one that fits."""
    listed = list(manifest["variants"])
    by_quality = ranking(manifest) == "measured_quality"
    ordered = sorted(listed, key=quality_key if by_quality else precision_key)  # stable
    notes = []
    if [v["name"] for v in ordered] != [v["name"] for v in listed]:
        what = "best measured quality" if by_quality else "most precise"
        notes.append(f"manifest variants were not listed {what} first; sorted that way")
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
              float(variant["avg_bits"]), float(q["perplexity"]) if q else None)
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
    row.predicted_bytes = row.resident_bytes + row.kv_bytes + row.workspace_bytes + row.overhead_bytes
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
    if ranking(manifest) == "measured_quality":
        d.reason = (f"{first.name}: the best measured quality that fits (perplexity "
                    f"{first.perplexity:.3f} on held-out calibration text; needs "
                    f"{format_size(first.need_bytes)} of {format_size(free)} free)")
        if better:
            d.reason += (f"; {better[-1].name} ({better[-1].perplexity:.3f}) would need "
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
