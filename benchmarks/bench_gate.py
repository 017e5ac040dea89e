"""The measurement gate (issue 22): two bundles of one model built with the same profile but a
different scoring.measure, every rung's held-out WikiText-2 perplexity side by side.

Rungs are at the same byte budgets in both builds (the ladder's budgets depend on the shapes
and the quantizers, not on the measurement), so the i-th variant of one bundle is compared with
the i-th of the other. Variants are measured here (their ONNX CPU graphs, the windows of
`lsaq-compile eval`); with --reuse-recorded the first bundle's recorded values are read back
(those named in --check measured again beside them), and a variant of the second bundle with
the very plan of its rung in the first (same precisions and tables: the same graph) takes
that value. Nothing is written into the bundles.

    python benchmarks/bench_gate.py --bundle exact=/tmp/t20/smollm2 \\
        --bundle fisher=/tmp/t22b/smollm2-fisher [--windows 16] [--seq-len 1024] [--out F.json]
        [--reuse-recorded --check mix6.08]

One new bundle against a gate already recorded (its rungs' plans and perplexities, e.g.
docs/results/measurement_gate.json): the recorded first bundle is the reference, and a rung
whose plan is one the record measured takes that value; the others are measured.

    python benchmarks/bench_gate.py --recorded docs/results/measurement_gate.json \
        --bundle probes8=/tmp/smollm2-probes8
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


def measure(bundle: Path, seq_len: int, windows: int, log, recorded_ok: bool = False,
            skip: dict | None = None, check: tuple = ()) -> list[dict]:
    """Every variant's WikiText-2 perplexity: measured now, or (recorded_ok) read back from the
    evaluations `lsaq-compile eval` / bench_ranking recorded for these very windows (the
    variants named in `check` are measured again beside their recorded value), or (skip:
    name -> (ppl, why)) taken from an identical variant of the other bundle."""
    from lsaq_compile import evaluate as ev
    from lsaq_compile.bundle import read_manifest

    m = read_manifest(bundle)
    tw = ev.text_windows(TEXT, ev.bundle_codec(bundle, m), seq_len, windows)
    settings = {"seq_len": seq_len, "windows": len(tw.windows)}
    recorded = {e["variant"]: e["value"] for e in ev.read_evaluations(bundle, m)
                if e.get("kind") == "perplexity" and e.get("data_sha256") == tw.sha256
                and e.get("settings") == settings and e.get("engine", "onnx") == "onnx"}
    out = []
    for v in m["variants"]:
        row = {"name": v["name"], "weight_bytes": v.get("weight_bytes"),
               "bits_per_weight": v.get("bits_per_weight"), "precisions": v["precisions"],
               "tables": v.get("tables"), "kl_fp16": v.get("quality", {}).get("kl_fp16")}
        if skip and v["name"] in skip:
            row["ppl"], row["source"] = skip[v["name"]]
        elif recorded_ok and v["name"] in recorded and v["name"] not in check:
            row["ppl"], row["source"] = recorded[v["name"]], "recorded"
        else:
            t0 = time.perf_counter()
            fn = ev.onnx_logits_fn(bundle, m, v["name"], context=seq_len)
            r = ev.perplexity(fn, tw)
            fn.close()
            row.update(ppl=r["perplexity"], source="measured", tokens=r["tokens"],
                       seconds=round(time.perf_counter() - t0, 1))
            if v["name"] in recorded:
                row["recorded"] = recorded[v["name"]]
            log(f"{bundle.name} {v['name']}: WikiText-2 perplexity {r['perplexity']:.3f} "
                f"({row['seconds']:.0f}s)" + (f", recorded {recorded[v['name']]:.3f}"
                                              if v["name"] in recorded else ""))
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", action="append", required=True,
                    help="LABEL=PATH (two; one with --recorded)")
    ap.add_argument("--recorded", type=Path, help="a gate's JSON (--out) whose first bundle is "
                    "the reference: its rungs' plans and perplexities, not measured again")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reuse-recorded", action="store_true", help="take the first bundle's "
                    "recorded WikiText-2 perplexities for these windows where it has them")
    ap.add_argument("--check", default="", help="with --reuse-recorded: variants of the first "
                    "bundle measured again anyway (comma-separated), beside the recorded value")
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    labels = [spec.partition("=") for spec in args.bundle]
    from lsaq_compile.bundle import read_manifest

    if args.recorded:
        rec = json.loads(args.recorded.read_text(encoding="utf-8"))
        args.windows, args.seq_len = rec["windows"], rec["seq_len"]   # the record's windows
        a, (b, _, pb) = next(iter(rec["variants"])), labels[0]
        ra = [{**r[a], "source": f"recorded in {args.recorded.name}"} for r in rec["rungs"]]
        known = [(r[x], x) for r in rec["rungs"] for x in rec["variants"]]
    else:
        (a, _, pa), (b, _, pb) = labels[:2]
        check = tuple(x for x in args.check.split(",") if x)
        ra = measure(Path(pa), args.seq_len, args.windows, log, recorded_ok=args.reuse_recorded,
                     check=check)
        known = [(x, a) for x in ra]
    same = {}
    for v in read_manifest(Path(pb))["variants"]:
        for x, label in known:
            if (x["precisions"], x["tables"]) == (v["precisions"], v.get("tables")):
                same[v["name"]] = (x["ppl"], f"same plan as {label} {x['name']}")
                break
    rb = measure(Path(pb), args.seq_len, args.windows, log, skip=same)
    rows = []
    for x, y in zip(ra, rb):
        rows.append({"rung": len(rows), a: x, b: y, "ratio": y["ppl"] / x["ppl"]})
    worst = max(r["ratio"] for r in rows)
    res = {"windows": args.windows, "seq_len": args.seq_len, "text": TEXT.name,
           "variants": {a: len(ra), b: len(rb)}, "rungs": rows, "worst_ratio": worst,
           "passes_1pct": bool(len(ra) == len(rb) and worst <= 1.01)}
    print(f"| rung | {a} variant | {a} bytes | {a} ppl | {b} variant | {b} bytes | {b} ppl | "
          f"{b}/{a} | how |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x, y = r[a], r[b]
        how = f"{a} {x['source']}" + (f" (recorded {x['recorded']:.3f})" if "recorded" in x
                                       else "") + f"; {b} {y['source']}"
        print(f"| {r['rung']} | {x['name']} | {x['weight_bytes']:,} | {x['ppl']:.3f} | "
              f"{y['name']} | {y['weight_bytes']:,} | {y['ppl']:.3f} | {r['ratio']:.4f} | {how} |")
    print(f"worst ratio {worst:.4f}; within 1% at every rung: {res['passes_1pct']}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
