"""The serving policy alone: readings in, the variant to hold out. No engine, no threads, no
sleeps; time is a number."""

from __future__ import annotations


from lsaq_runtime.planner import plan
from lsaq_runtime.serve.policy import (FAILED_BACKOFF_S, Holding, Reading, choose,
                                       recent_failures)
from factories.synthetic import host, synthetic_manifest

CTX = 1024


def _setup():
    m = synthetic_manifest()
    need = {r.name: r.need_bytes for r in plan(m, host(2**40), context=CTX).rows}
    return m, need


def _holding(m, variant, **kw) -> Holding:
    """What the engine holds after loading `variant` (its predicted bytes counted back)."""
    if variant is None:
        return Holding(**kw)
    row = next(r for r in plan(m, host(2**40), context=CTX).rows if r.name == variant)
    return Holding(variant, row, row.predicted_bytes, **kw)


def _free_for(m, need, variant, holding):
    """A device reading at which `variant` just fits, with `holding`'s bytes counted back."""
    return host(need[variant] - holding.held_bytes)


def test_first_choice_is_the_best_that_fits():
    m, need = _setup()
    c = choose(m, CTX, Reading(host(need["int8"]), None, 0.0), Holding(), upgrade_after=30)
    assert c.variant == "int8" and "the most precise variant that fits" in c.reason
    c = choose(m, CTX, Reading(host(2**40), need["int4x03"], 0.0), Holding(), upgrade_after=30)
    assert c.variant == "int4x03" and c.decision.budget_bytes == need["int4x03"]


def test_down_at_once_up_only_after_upgrade_after():
    m, need = _setup()
    held = _holding(m, "fp16")
    squeezed = Reading(_free_for(m, need, "int8", held), None, 10.0)
    c = choose(m, CTX, squeezed, held, upgrade_after=30)
    assert c.variant == "int8" and c.reason.startswith("memory shrank: fp16 needs")
    held = _holding(m, "int8")
    roomy = _free_for(m, need, "fp16", held)
    c = choose(m, CTX, Reading(roomy, None, 20.0), held, upgrade_after=30)
    assert (c.variant, c.better_since) == ("int8", 20.0)         # the clock starts
    held = _holding(m, "int8", better_since=c.better_since)
    c = choose(m, CTX, Reading(roomy, None, 49.9), held, upgrade_after=30)
    assert (c.variant, c.reason) == ("int8", "")
    c = choose(m, CTX, Reading(roomy, None, 50.0), held, upgrade_after=30)
    assert c.variant == "fp16" and "stayed free for 30.0s" in c.reason


def test_hysteresis_restarts_when_memory_comes_and_goes():
    m, need = _setup()
    held = _holding(m, "int8", better_since=5.0)
    tight = _free_for(m, need, "int8", held)
    c = choose(m, CTX, Reading(tight, None, 6.0), held, upgrade_after=30)
    assert (c.variant, c.better_since) == ("int8", None)


def test_the_held_variant_counts_its_own_memory():
    """A probe sees free memory after the loaded variant took its share: counted back, the
    variant that exactly fits keeps fitting."""
    m, need = _setup()
    held = _holding(m, "fp16")
    for t in range(5):
        c = choose(m, CTX, Reading(_free_for(m, need, "fp16", held), None, float(t)), held, 0)
        assert c.variant == "fp16" and c.decision.free_bytes == need["fp16"]


def test_pause_when_nothing_fits_and_skip_recent_failures():
    m, need = _setup()
    c = choose(m, CTX, Reading(host(1 << 20), None, 0.0), _holding(m, "int8"), 30)
    assert c.variant is None and c.reason.startswith("no variant fits")
    c = choose(m, CTX, Reading(host(need["fp16"]), None, 0.0),
               Holding(failed=frozenset({"fp16"})), 30)
    assert c.variant == "int8"
    every = frozenset(r for r in need)
    c = choose(m, CTX, Reading(host(need["fp16"]), None, 0.0), Holding(failed=every), 30)
    assert c.variant is None and "failed to load" in c.reason
    failed = {"fp16": 0.0, "int8": 10.0}
    assert recent_failures(failed, FAILED_BACKOFF_S + 5) == {"int8": 10.0}


def test_a_changed_bundle_loads_nothing_new():
    m, need = _setup()
    why = "the bundle changed on disk"
    held = _holding(m, "int8", bundle_changed=why)
    c = choose(m, CTX, Reading(host(2**40), None, 100.0), held, upgrade_after=0)
    assert (c.variant, c.reason) == ("int8", "")                  # kept while it fits
    c = choose(m, CTX, Reading(_free_for(m, need, "int4x05", held), None, 0.0), held, 0)
    assert (c.variant, c.reason) == (None, why)                   # no other variant loads
