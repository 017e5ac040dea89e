"""Which build-time number best predicts held-out quality (a benchmark, not a test).

A bundle measures every variant at build time on held-out calibration windows: its perplexity
and its KL from the FP16 variant (both on the shipped CPU graphs). The runtime loads the first
variant that fits in the order one of them gives. This measures each order against the quality
a user gets: WikiText-2 test perplexity of every variant (the windows of `lsaq-compile eval`),
read back from the bundle's recorded evaluations or measured here and recorded.

For each predictor: Spearman's rank correlation with WikiText-2 perplexity, the share of variant
pairs it orders as WikiText-2 does, and the regret of the choice it makes: at every memory
budget (each variant's need), the WikiText-2 perplexity of the variant the runtime would load
ranked by that predictor (with the rule that a variant never ranks above one at least as precise
in every part) against the best that fits.

    python benchmarks/bench_ranking.py --bundle smollm2=BUNDLE [--bundle gemma3=BUNDLE ...]
        [--windows 16] [--seq-len 1024] [--out docs/results/ranking]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

from lsaq_runtime.planner import plan, quality_order  # noqa: E402
from lsaq_runtime.probe import Device  # noqa: E402

PREDICTORS = {"kl_fp16": "KL from FP16 (held-out calibration)",
              "perplexity": "perplexity (held-out calibration)"}


def wikitext(bundle: Path, m: dict, seq_len: int, windows: int, log) -> dict[str, float]:
    """Every variant's WikiText-2 perplexity on the eval windows: recorded, or measured and
    recorded (the same entries `lsaq-compile eval` writes)."""
    from lsaq_compile import evaluate as ev

    tw = ev.text_windows(TEXT, ev.bundle_codec(bundle, m), seq_len, windows)
    settings = {"seq_len": seq_len, "windows": len(tw.windows)}
    recorded = {e["variant"]: e["value"] for e in m.get("evaluations", [])
                if e.get("kind") == "perplexity" and e.get("data_sha256") == tw.sha256
                and e.get("settings") == settings and e.get("engine", "onnx") == "onnx"}
    out, new = {}, []
    for v in m["variants"]:
        name = v["name"]
        if name in recorded:
            out[name] = recorded[name]
            continue
        t0 = time.perf_counter()
        fn = ev.onnx_logits_fn(bundle, m, name, context=seq_len)
        r = ev.perplexity(fn, tw)
        fn.close()
        out[name] = r["perplexity"]
        new.append({"variant": name, "provider": "cpu", "engine": "onnx", "kind": "perplexity",
                    "data": tw.source, "data_sha256": tw.sha256, "settings": settings,
                    "value": r["perplexity"], "tokens": r["tokens"]})
        log(f"{name}: WikiText-2 perplexity {r['perplexity']:.3f} ({time.perf_counter() - t0:.0f}s)")
    if new:
        ev.record_evaluations(bundle, new)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def pair_agreement(a: list[float], b: list[float]) -> float:
    n = len(a)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if b[i] != b[j]]
    same = sum((a[i] - a[j]) * (b[i] - b[j]) > 0 for i, j in pairs)
    return same / len(pairs) if pairs else float("nan")


def regret(m: dict, truth: dict[str, float], key: str) -> tuple[float, int, list]:
    """Mean relative excess WikiText-2 perplexity of the runtime's choice over the best that
    fits, over budgets at every variant's need; and how many budgets chose worse."""
    m = json.loads(json.dumps(m))
    m["deployment"]["rank_by"] = "kl_fp16" if key == "kl_fp16" else "measured_quality"
    host = Device("cpu", None, "sim", 2**40, 2**40, "bench")
    rows = plan(m, host).rows
    out, worse, choices = [], 0, []
    for r in rows:
        d = plan(m, host, budget=r.need_bytes, simulate=True)
        fits = [x.name for x in d.rows if x.fits]
        best = min(truth[n] for n in fits)
        got = truth[d.chosen]
        out.append(got / best - 1)
        worse += got > best
        choices.append((r.need_bytes, d.chosen, round(got, 3), round(best, 3)))
    return float(np.mean(out)), worse, choices


def analyse(label: str, bundle: Path, args, log) -> dict:
    from lsaq_compile.bundle import read_manifest

    m = read_manifest(bundle)
    if not all("quality" in v and "kl_fp16" in v["quality"] for v in m["variants"]):
        raise SystemExit(f"{bundle}: build it with quality_samples > 0 (schema 6: kl_fp16)")
    truth = wikitext(bundle, m, args.seq_len, args.windows, log)
    m = read_manifest(bundle)
    names = [v["name"] for v in m["variants"]]
    q = {v["name"]: v["quality"] for v in m["variants"]}
    res = {"bundle": str(bundle), "model": m["model"]["name"],
           "calibration": m["deployment"].get("quality", {}),
           "variants": [{"name": n, "wikitext_ppl": truth[n], **{k: q[n][k] for k in PREDICTORS},
                         "bits_per_weight": next(v.get("bits_per_weight") for v in m["variants"]
                                                 if v["name"] == n)} for n in names],
           "predictors": {}}
    t = [truth[n] for n in names]
    for key in PREDICTORS:
        p = [q[n][key] for n in names]
        mean_regret, worse, choices = regret(m, truth, key)
        order = [v["name"] for v in quality_order(m["variants"], "kl_fp16" if key == "kl_fp16"
                                                 else "measured_quality")]
        res["predictors"][key] = {"spearman": round(spearman(p, t), 4),
                                  "pair_agreement": round(pair_agreement(p, t), 4),
                                  "mean_regret": round(mean_regret, 5), "budgets_worse": worse,
                                  "budgets": len(choices), "order": order, "choices": choices}
    return res


def markdown(results: dict, args) -> str:
    lines = ["# Ranking variants: which build-time number predicts held-out quality", "",
             f"Command: `python benchmarks/bench_ranking.py "
             + " ".join(f"--bundle {k}={v['bundle']}" for k, v in results.items())
             + f" --windows {args.windows} --seq-len {args.seq_len}`", "",
             f"Truth: WikiText-2 test perplexity, first {args.windows} windows of {args.seq_len} "
             "tokens each framed as the model frames a prompt (BOS first where it expects one), "
             "every variant's ONNX CPU graph. Predictors: what the build measured on held-out "
             "calibration windows. Regret: at each variant's need as the memory budget, how much "
             "worse (WikiText-2 perplexity) the variant the runtime loads under that ranking is "
             "than the best that fits; the dominance rule applies to both.", ""]
    for label, r in results.items():
        lines += [f"## {label}: {r['model']}", "",
                  f"Held-out calibration: {r['calibration'].get('windows')} windows of "
                  f"{r['calibration'].get('seq_len')} tokens from "
                  f"`{Path(str(r['calibration'].get('source'))).name}`.", "",
                  "| variant | bits/weight | KL from FP16 | calibration ppl | WikiText-2 ppl |",
                  "|---|---|---|---|---|"]
        for v in r["variants"]:
            lines.append(f"| {v['name']} | {v['bits_per_weight'] or 0:.2f} | {v['kl_fp16']:.5f} | "
                         f"{v['perplexity']:.3f} | {v['wikitext_ppl']:.3f} |")
        lines += ["", "| predictor | Spearman vs WikiText-2 | pairs ordered alike | mean regret | "
                      "budgets with a worse choice |", "|---|---|---|---|---|"]
        for key, p in r["predictors"].items():
            lines.append(f"| {PREDICTORS[key]} | {p['spearman']:.3f} | {p['pair_agreement']:.3f} "
                         f"| {100 * p['mean_regret']:.2f}% | {p['budgets_worse']}/{p['budgets']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", required=True, help="LABEL=PATH")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--out", type=Path, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    results = {}
    for spec in args.bundle:
        label, _, path = spec.partition("=")
        log = lambda msg, label=label: print(f"[{label}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
        results[label] = analyse(label, Path(path), args, log)
    text = markdown(results, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
