"""Which variant would a device with each of these budgets get? (dry run: nothing is loaded)

    python examples/choose_variant.py BUNDLE [--context 2048] [--device cpu|cuda]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))

from lsaq_runtime import (Device, LsaqRuntimeError, NoVariantFits, decide, format_size,  # noqa: E402
                          load_manifest, parse_size, plan)

BUDGETS = ["200MiB", "300MiB", "400MiB", "512MiB", "640MiB", "768MiB", "1GiB", "1.5GiB", "2GiB"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="which graphs to plan for (a simulated device of that kind)")
    ap.add_argument("budgets", nargs="*", default=BUDGETS)
    args = ap.parse_args()
    manifest = load_manifest(args.bundle)

    print(f"{'budget':>9}  {'variant':<9} {'int8':>4} {'int4':>4} {'mixed':>5} {'bits':>5} {'need':>10}")
    for text in args.budgets:
        budget = parse_size(text)
        # A simulated device with exactly this much free memory; decide(..., simulate=True)
        # does the same for the real device (probe.simulated).
        device = Device(args.device, 0 if args.device == "cuda" else None, "simulated", budget, budget, "example")
        d = plan(manifest, device, context=args.context)
        row = d.chosen_row
        if row is None:
            print(f"{format_size(budget):>9}  (nothing fits: smallest needs {format_size(d.smallest_need)})")
            continue
        c = row.layer_counts
        print(f"{format_size(budget):>9}  {row.name:<9} {c['int8']:>4} {c['int4']:>4} "
              f"{c.get('mixed', 0):>5} {row.avg_bits:>5.2f} {format_size(row.need_bytes):>10}")

    # The same question for this machine, as `lsaq-run BUNDLE --dry-run` would answer it:
    try:
        print("\nthis machine:\n" + decide(args.bundle, context=args.context, device="auto").table())
    except NoVariantFits as e:
        print(f"\nthis machine: {e}")


if __name__ == "__main__":
    try:
        main()
    except LsaqRuntimeError as e:
        sys.exit(f"error: {e}")
