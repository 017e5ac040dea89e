"""Does the compute dtype change the default measurement? The streamed estimate's costs in
float16/bfloat16 (a GPU's default is float16) against float32 with the same probes, next to
float32 against itself with other probes (the estimator's own noise, for scale). A benchmark,
not a test: float16 runs on a CPU through a slow fallback, on a GPU it is the default.

    python benchmarks/bench_measure_dtype.py [--model PATH] [--device cpu|cuda]
        [--dtypes float16] [--windows 2] [--seq-len 64] [--probes 16]

Prints one row per comparison: Spearman over every unit x layer x precision cost, the cost
ratio's min / 1st percentile / median / 99th / max, and the median |log ratio|.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]

from lsaq_compile import estimate as E  # noqa: E402
from lsaq_compile.activations import activation_stats  # noqa: E402
from lsaq_compile.model_source import default_model_path, open_model  # noqa: E402
from lsaq_compile.profiles import Profile  # noqa: E402
from lsaq_compile.quantize import QuantSettings  # noqa: E402


def costs(est) -> np.ndarray:
    c = est.cost("fisher")
    return np.array([c[u][i][q] for u in c for i in range(len(c[u])) for q in ("int8", "int4")])


def row(label: str, ref: np.ndarray, got: np.ndarray) -> str:
    from scipy.stats import spearmanr

    r = got / ref
    pct = np.percentile(r, [0, 1, 50, 99, 100])
    return (f"| {label} | {spearmanr(ref, got)[0]:.4f} | " + " / ".join(f"{x:.3f}" for x in pct)
            + f" | {100 * np.median(np.abs(np.log(r))):.1f}% |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float16", help="comma-separated: float16,bfloat16")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--probes", type=int, default=Profile().scoring.probes)
    a = ap.parse_args(argv)
    schemes = QuantSettings.from_profile(Profile().quantization).schemes()   # the default's
    src = open_model(a.model or default_model_path())
    win = np.random.default_rng(0).integers(3, src.spec.vocab_size, size=(a.windows, a.seq_len))
    act = activation_stats(src, win)
    runs = {}
    for name, kw in [("float32 seed 0", dict(seed=0)), ("float32 seed 1", dict(seed=1))] + \
            [(f"{d} seed 0", dict(seed=0, dtype=d)) for d in a.dtypes.split(",")]:
        t = time.perf_counter()
        runs[name] = costs(E.estimate(src, win, schemes, act, probes=a.probes, device=a.device,
                                      **kw))
        print(f"{name} on {a.device}: {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
    print(f"\n{src.path.name}, {a.windows} x {a.seq_len} tokens, {a.probes} probes, "
          f"{len(runs['float32 seed 0'])} costs, device {a.device}\n")
    print("| compared | Spearman | cost ratio min / 1% / median / 99% / max | median \\|log\\| |")
    print("|---|---|---|---|")
    ref = runs["float32 seed 0"]
    for d in a.dtypes.split(","):
        print(row(f"{d} against float32, same probes", ref, runs[f"{d} seed 0"]))
    print(row("float32, other probes (the estimator's noise)", ref, runs["float32 seed 1"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
