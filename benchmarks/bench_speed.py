"""Prefill and decode speed of each variant through the runtime (a benchmark, not a test).

    python benchmarks/bench_speed.py --bundle BUNDLE [--variants fp16 int8 int4] [--prompt 256] [--new 64] [--repeats 5]

Variants are measured side by side in one run, interleaved round-robin so that machine noise
hits all of them alike; the table gives medians and the ratio to the first variant.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime")]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

import lsaq_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--variants", nargs="+", default=None, help="default: fp16, int8 and the smallest mix")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=64, help="generated tokens (decode)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    manifest = lsaq_runtime.load_manifest(args.bundle)
    names = args.variants or ["fp16", "int8", manifest["variants"][-1]["name"]]
    context = args.prompt + args.new + 1
    models = {n: lsaq_runtime.load(args.bundle, variant=n, device="cpu", context=context,
                                   threads=args.threads, log=lambda m: None) for n in names}
    source = TEXT.read_text(encoding="utf-8") if TEXT.is_file() else "The quick brown fox. " * 5000
    ids = next(iter(models.values())).codec.encode(source[: args.prompt * 10])[: args.prompt]
    greedy = lambda logits: int(logits.argmax())
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    for _ in range(args.repeats):
        for n, m in models.items():
            t0 = time.perf_counter()
            m.forward(ids, 0, 1)
            t1 = time.perf_counter()
            out = list(m.generate_ids(ids, args.new + 1, greedy))  # prefill again, then decode
            t2 = time.perf_counter()
            prefill[n].append(args.prompt / (t1 - t0))
            decode[n].append(max(1, len(out) - 1) / max(1e-9, (t2 - t1) - (t1 - t0)))
    base = names[0]
    p0, d0 = statistics.median(prefill[base]), statistics.median(decode[base])
    print(f"CPU provider, {args.prompt}-token prompt, {args.new} new tokens, median of {args.repeats}")
    print(f"{'variant':<9} {'avg bits':>8} {'prefill tok/s':>14} {'x ' + base:>9} {'decode tok/s':>13} {'x ' + base:>9}")
    for n in names:
        v = next(x for x in manifest["variants"] if x["name"] == n)
        p, d = statistics.median(prefill[n]), statistics.median(decode[n])
        print(f"{n:<9} {v['avg_bits']:>8.2f} {p:>14.1f} {p / p0:>9.2f} {d:>13.1f} {d / d0:>9.2f}")


if __name__ == "__main__":
    main()
