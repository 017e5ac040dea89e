"""The measurement gate (issue 22): two bundles of one model built with the same profile but a
different scoring.measure, every rung's held-out WikiText-2 perplexity side by side.

Rungs are at the same byte budgets in both builds (the ladder's budgets depend on the shapes
and the quantizers, not on the measurement), so the i-th variant of one bundle is compared with
the i-th of the other. Every variant is measured here, in this run (its ONNX CPU graph, the
windows of `lsaq-compile eval`), not read back from recorded evaluations; nothing is written
into the bundles.

    python benchmarks/bench_gate.py --bundle exact=/tmp/t20/smollm2 \\
        --bundle fisher=/tmp/t22b/smollm2-fisher [--windows 16] [--seq-len 1024] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def measure(bundle: Path, seq_len: int, windows: int, log) -> list[dict]:
    from lsaq_compile import evaluate as ev
    from lsaq_compile.bundle import read_manifest

    m = read_manifest(bundle)
    tw = ev.text_windows(TEXT, ev.bundle_codec(bundle, m), seq_len, windows)
    out = []
    for v in m["variants"]:
        t0 = time.perf_counter()
        fn = ev.onnx_logits_fn(bundle, m, v["name"], context=seq_len)
        r = ev.perplexity(fn, tw)
        fn.close()
        out.append({"name": v["name"], "weight_bytes": v.get("weight_bytes"),
                    "bits_per_weight": v.get("bits_per_weight"), "ppl": r["perplexity"],
                    "tokens": r["tokens"], "kl_fp16": v.get("quality", {}).get("kl_fp16"),
                    "seconds": round(time.perf_counter() - t0, 1)})
        log(f"{bundle.name} {v['name']}: WikiText-2 perplexity {r['perplexity']:.3f} "
            f"({out[-1]['seconds']:.0f}s)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True, help="LABEL=PATH (two)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    runs = {}
    for spec in args.bundle:
        label, _, path = spec.partition("=")
        runs[label] = measure(Path(path), args.seq_len, args.windows, log)
    (a, ra), (b, rb) = list(runs.items())[:2]
    rows = []
    for x, y in zip(ra, rb):
        rows.append({"rung": len(rows), a: x, b: y, "ratio": y["ppl"] / x["ppl"]})
    worst = max(r["ratio"] for r in rows)
    res = {"windows": args.windows, "seq_len": args.seq_len, "text": TEXT.name,
           "variants": {a: len(ra), b: len(rb)}, "rungs": rows, "worst_ratio": worst,
           "passes_1pct": bool(len(ra) == len(rb) and worst <= 1.01)}
    print(f"| rung | {a} variant | {a} bytes | {a} ppl | {b} variant | {b} bytes | {b} ppl | "
          f"{b}/{a} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        x, y = r[a], r[b]
        print(f"| {r['rung']} | {x['name']} | {x['weight_bytes']:,} | {x['ppl']:.3f} | "
              f"{y['name']} | {y['weight_bytes']:,} | {y['ppl']:.3f} | {r['ratio']:.4f} |")
    print(f"worst ratio {worst:.4f}; within 1% at every rung: {res['passes_1pct']}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
