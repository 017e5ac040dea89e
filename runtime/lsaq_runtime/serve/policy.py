"""Which variant a server should hold: a pure function of one memory reading, the variant it
holds and the time. No threads, no clocks, no I/O: the engine calls `choose` at every probe and
acts on the answer; tests call it with made-up readings.

The rules:
- the loaded variant's own memory is not free memory a probe can see, so it is counted back:
  free to plan with = free seen + the loaded variant's predicted bytes (budget applied). Without
  that a loaded variant would push itself out;
- down at once when the loaded variant no longer fits;
- up only after a better variant has fitted at every reading for `upgrade_after` seconds
  (hysteresis: no flapping at an edge);
- none (pause) when nothing fits; a variant that failed to load recently is not chosen;
- once the bundle changed on disk, no other variant loads: keep the one held while it fits,
  else pause.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..planner import Decision, Row, no_fit_message, plan, ranking
from ..probe import Device
from ..sizes import format_size

# A variant that failed to load is not planned for again for this long (a damaged file or a
# session that runs out of memory would otherwise be retried at every probe).
FAILED_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Reading:
    """One observation: the device as probed, the memory budget then, and the time."""
    device: Device
    budget: int | None
    now: float


@dataclass(frozen=True)
class Holding:
    """What the server holds when the reading is taken."""
    variant: str | None = None        # the loaded variant; None while paused
    row: Row | None = None            # its plan row when it was loaded
    held_bytes: int = 0               # its predicted bytes (counted back as free)
    better_since: float | None = None  # since when a better variant has kept fitting
    failed: frozenset[str] = frozenset()   # variants that failed to load recently
    bundle_changed: str | None = None  # why no other variant may load, once the bundle changed


@dataclass(frozen=True)
class Choice:
    variant: str | None         # the variant to hold; None: pause
    reason: str                 # why ("" when the answer is to keep what is held)
    decision: Decision          # the plan it was read from
    better_since: float | None  # the hysteresis clock to carry to the next reading


def recent_failures(failed: dict[str, float], now: float) -> dict[str, float]:
    """The load failures (variant -> when) still inside the back-off."""
    return {k: t for k, t in failed.items() if now - t < FAILED_BACKOFF_S}


def choose(manifest: dict, context: int, reading: Reading, holding: Holding,
           upgrade_after: float) -> Choice:
    """The variant to hold after `reading` (see the module doc)."""
    dev, now, current = reading.device, reading.now, holding.variant
    held = holding.held_bytes
    seen = replace(dev, free_bytes=dev.free_bytes + held)
    d = plan(manifest, seen, context=context, budget=reading.budget)
    fitting = [r for r in d.rows if r.fits and r.name not in holding.failed]
    best = fitting[0] if fitting else None
    rank = {r.name: i for i, r in enumerate(d.rows)}
    where = free_story(d, dev, held, current)
    cur = next((r for r in d.rows if r.name == current), None)
    better_since = holding.better_since
    if best is None:
        reason = no_fit_message(d) if d.chosen is None else (
            "every variant that fits failed to load in the last "
            f"{FAILED_BACKOFF_S:.0f}s (see above)")
        want, better_since = None, None
    elif current is None:
        want, reason = best.name, fit_reason(d, best, where)
    elif cur is None or not cur.fits:
        need = (holding.row or cur).need_bytes
        want = best.name
        reason = (f"memory shrank: {current} needs {describe_bytes(need)} but "
                  f"{describe_bytes(d.free_bytes)} is free to plan with ({where})")
        better_since = None
    elif rank[best.name] < rank[current]:
        better_since = now if better_since is None else better_since
        held_for = now - better_since
        if held_for >= upgrade_after:
            want = best.name
            reason = (f"memory freed and stayed free for {held_for:.1f}s (at least "
                      f"{upgrade_after:g}s): {describe_bytes(d.free_bytes)} is free to "
                      f"plan with ({where})")
        else:
            want, reason = current, ""
    else:
        want, reason, better_since = current, "", None
    if holding.bundle_changed and want is not None and want != current:
        keep = current is not None and cur is not None and cur.fits
        want, reason = (current, "") if keep else (None, holding.bundle_changed)
    return Choice(want, reason, d, better_since)


# ------------------------------------------------------------------------------- the words
def describe_bytes(n: int | None) -> str:
    return "-" if n is None else f"{format_size(n)} ({n} B)"


def what_fits(d: Decision) -> str:
    return ("the best measured quality that fits"
            if ranking(d.manifest) in ("kl_fp16", "measured_quality")
            else "the most precise variant that fits")


def fit_reason(d: Decision, row: Row, where: str) -> str:
    return (f"{row.name} is {what_fits(d)} (needs {describe_bytes(row.need_bytes)} of "
            f"{describe_bytes(d.free_bytes)} free: {where})")


def free_story(d: Decision, dev: Device, held: int, current: str | None) -> str:
    s = f"{dev.label}: {describe_bytes(dev.free_bytes)} free"
    if held:
        s += f" + {describe_bytes(held)} held by {current}"
    if d.budget_bytes is not None:
        s += f", budget {describe_bytes(d.budget_bytes)}"
    return s
