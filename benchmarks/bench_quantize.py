"""How long the quantizers take on one decoder layer of a real model's shape (a benchmark, not a
test): the build makes every linear's INT8 and INT4 candidate once, and at 7B width that
clipping search was the largest part of the probes' stage.

    python benchmarks/bench_quantize.py [--shape llama-2-7b] [--repeats 3]

Random weights with the layer's shapes (benchmarks/checkpoints.py); activation statistics
random too (the search's cost does not depend on them). Each setting quantizes the whole layer
at the default profile's INT4 (group 32, asymmetric, clip mse-act) and INT8 (per channel, round
to nearest), medians of `repeats`, wall and CPU seconds side by side in one run:
  - `numpy search, N threads`: the weighted search in numpy (einsum), as it was;
  - `torch search, one thread`: quantize._search_weighted on one row range;
  - `torch search, N threads`: today's default (row ranges on every usable CPU).
Every setting's bytes are checked equal to the first's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lsaq_compile.quantize as Q  # noqa: E402
from checkpoints import SHAPES, cpu_description, layer_linears  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-2-7b", help="one of: " + ", ".join(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layer = [(m, rng.standard_normal((n, k), dtype=np.float32) * 0.02,
              rng.random(k, dtype=np.float32)) for m, n, k in layer_linears(SHAPES[args.shape])]
    params = sum(w.size for _, w, _ in layer)
    schemes = Q.schemes_for("group", 32, symmetric=False, clip="mse-act")
    cpus = Q._workers()
    gs_max0 = Q._WEIGHTED_GS_MAX
    settings = [(f"numpy search, {cpus} threads", 0, None), ("torch search, one thread", gs_max0, 1),
                (f"torch search, {cpus} threads (default)", gs_max0, None)]
    print(f"{args.shape}: one decoder layer, {params / 1e6:.0f}M weights, {cpus} usable CPUs "
          f"({cpu_description()}), medians of {args.repeats}")
    rows, first = [], {}
    for label, gs_max, workers in settings:
        Q._WEIGHTED_GS_MAX = gs_max
        for prec in ("int4", "int8"):
            walls, cpus_s = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                out = [Q.quantize(w, schemes[prec], act=a if prec == "int4" else None,
                                  workers=workers) for _, w, a in layer]
                walls.append(time.perf_counter() - t)
                cpus_s.append(time.process_time() - c)
            key = prec
            if key not in first:
                first[key] = out
            same = all(np.array_equal(x.packed, y.packed) and np.array_equal(x.scales, y.scales)
                       for x, y in zip(out, first[key]))
            rows.append((label, prec, statistics.median(walls), statistics.median(cpus_s), same))
    Q._WEIGHTED_GS_MAX = gs_max0
    base = {p: w for label, p, w, _, _ in rows if label == settings[0][0]}
    print("\n| setting | precision | wall s | CPU s | speed-up | same bytes |")
    print("|---|---|---|---|---|---|")
    for label, prec, wall, cpu, same in rows:
        print(f"| {label} | {prec} | {wall:.2f} | {cpu:.2f} | {base[prec] / wall:.2f}x | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
