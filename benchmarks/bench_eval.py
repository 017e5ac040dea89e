"""Multiple-choice evaluation throughput: one run per (item, choice) against shared, batched
scoring (a benchmark, not a test).

    python benchmarks/bench_eval.py --bundle BUNDLE [--items 400] [--variants fp16 int8 int4]

Items: the first N of PIQA (validation) and the first N of BoolQ (validation) from
../shared/data/zeroshot, in lm-evaluation-harness's prompt formats, so 2N two-way items. For
each variant both ways are timed on the same items and their log-likelihoods compared.
"  one by one": every (item, choice) is its own prefill, as evaluation ran before;
"  batched":    evaluate.multiple_choice: equal inputs and prefixes share a row (BoolQ's
                " yes"/" no" read the same passage once), rows sorted by length and scored
                many per run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
DATA = REPO.parent / "shared" / "data" / "zeroshot"

import lsaq_runtime  # noqa: E402
from lsaq_compile import evaluate as ev  # noqa: E402
from lsaq_compile import zeroshot as zs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--items", type=int, default=400, help="items per task (PIQA, BoolQ)")
    ap.add_argument("--variants", nargs="+", default=["fp16", "int8", "int4"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    m = lsaq_runtime.load_manifest(bundle)
    encode = ev.encoder(ev.bundle_codec(bundle, m))
    tasks = {t: zs.load_task(t, DATA, args.items) for t in ("piqa", "boolq")}
    items = [it for t in tasks.values() for it in t]
    requests = [ev.split_request(encode, ctx, c) for it in items for ctx, c in it.requests]
    tokens = sum(len(w) - 1 for w, _ in requests)
    rows = ev.shared_rows(requests)[1]
    print(f"{len(items)} two-way items ({', '.join(f'{k} {len(v)}' for k, v in tasks.items())}): "
          f"{len(requests)} requests, {tokens} input tokens one by one; {len(rows)} shared rows, "
          f"{sum(map(len, rows))} tokens batched; CPU provider")
    print(f"{'variant':<8} {'one by one s':>12} {'batched s':>10} {'speed-up':>8} "
          f"{'max |d ll|':>10} {'acc piqa':>8} {'acc boolq':>9}")
    total_old = total_new = 0.0
    for v in args.variants:
        fn = ev.onnx_logits_fn(bundle, m, v, threads=args.threads)
        fn(np.asarray(requests[0][0]))  # load once, outside the timings
        t0 = time.perf_counter()
        old = [ev.continuation_loglikelihood(fn, encode, ctx, c)[0]
               for it in items for ctx, c in it.requests]
        t1 = time.perf_counter()
        res = {k: ev.multiple_choice(fn, encode, t) for k, t in tasks.items()}
        t2 = time.perf_counter()
        new = [ll for r in res.values() for d in r["details"] for ll in d["loglikelihoods"]]
        diff = float(np.max(np.abs(np.asarray(old) - np.asarray(new))))
        total_old, total_new = total_old + t1 - t0, total_new + t2 - t1
        print(f"{v:<8} {t1 - t0:>12.1f} {t2 - t1:>10.1f} {(t1 - t0) / (t2 - t1):>7.2f}x "
              f"{diff:>10.2e} {res['piqa']['acc']:>8.3f} {res['boolq']['acc']:>9.3f}")
    print(f"{'all':<8} {total_old:>12.1f} {total_new:>10.1f} {total_old / total_new:>7.2f}x")


if __name__ == "__main__":
    main()
