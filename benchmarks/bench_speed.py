"""Prefill, decode and launch speed of a bundle's variants through the runtime (a benchmark, not
a test).

    python benchmarks/bench_speed.py --bundle BUNDLE [--variants fp16 int8 int4] [--prompt 512] [--new 128] [--repeats 5]

Three tables, every number a median of runs interleaved round-robin so that machine noise hits
all variants alike:
  1. prefill and decode tokens/s per variant, the ratio to the first variant, and decode as
     bytes of weights read per second against this machine's measured memory bandwidth;
  2. launch: lsaq_runtime.load() split into planning, file verification (stamped after the
     first run), ONNX Runtime session creation and KV allocation, plus the first prefill:
     launch-to-first-token;
  3. session options for one variant: graph optimization level and weight prepacking, their
     session-creation time against their decode speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime")]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

import lsaq_runtime  # noqa: E402
from lsaq_runtime.probe import physical_cores  # noqa: E402


def memory_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: numpy sums over disjoint parts of a buffer far larger than
    the caches, one per thread; median of `repeats`."""
    a = np.ones(int(gib * 2**30) // 8, np.float64)
    parts = np.array_split(a, threads)
    out = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.sum, parts))
            out.append(a.nbytes / (time.perf_counter() - t0))
    return statistics.median(out)


def greedy_run(m, ids, new):
    """(prefill seconds, decode seconds for new-1 tokens), end-of-text ignored."""
    t0 = time.perf_counter()
    logits = m.forward(ids, 0, 1)[-1]
    t1 = time.perf_counter()
    pos = len(ids)
    for _ in range(new - 1):
        logits = m.forward([int(logits.argmax())], pos, 1)[-1]
        pos += 1
    return t1 - t0, time.perf_counter() - t1


def speed_table(bundle, manifest, names, ids, new, repeats, threads, bw):
    context = len(ids) + new + 1
    models = {n: lsaq_runtime.load(bundle, variant=n, device="cpu", context=context,
                                   threads=threads) for n in names}
    for m in models.values():
        greedy_run(m, ids[:16], 2)  # warm-up
    prefill = {n: [] for n in names}
    decode = {n: [] for n in names}
    for _ in range(repeats):
        for n, m in models.items():
            tp, td = greedy_run(m, ids, new)
            prefill[n].append(len(ids) / tp)
            decode[n].append((new - 1) / td)
    for m in models.values():
        m.close()
    base = names[0]
    p0, d0 = statistics.median(prefill[base]), statistics.median(decode[base])
    print(f"\n1. Speed: {len(ids)}-token prompt, {new} new tokens, median of {repeats}; memory read "
          f"bandwidth {bw / 1e9:.1f} GB/s (numpy, {threads} threads)")
    print(f"{'variant':<9} {'avg bits':>8} {'resident MiB':>12} {'prefill tok/s':>13} {'x ' + base:>8} "
          f"{'decode tok/s':>12} {'x ' + base:>8} {'GB/s read':>9} {'of bw':>6}")
    for n in names:
        v = next(x for x in manifest["variants"] if x["name"] == n)
        res = v["providers"]["cpu"]["resident_bytes"]
        p, d = statistics.median(prefill[n]), statistics.median(decode[n])
        print(f"{n:<9} {v['avg_bits']:>8.2f} {res / 2**20:>12.1f} {p:>13.0f} {p / p0:>8.2f} "
              f"{d:>12.1f} {d / d0:>8.2f} {res * d / 1e9:>9.2f} {res * d / bw:>6.0%}")


def launch_table(bundle, names, ids, repeats, threads):
    rows = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            t0 = time.perf_counter()
            m = lsaq_runtime.load(bundle, variant=n, device="cpu", context=len(ids) + 8,
                                  threads=threads)
            t1 = time.perf_counter()
            m.forward(ids, 0, 1)
            t2 = time.perf_counter()
            rows[n].append({**m.load_seconds, "load": t1 - t0, "first": t2 - t1, "ttft": t2 - t0})
            m.close()
    print(f"\n2. Launch: lsaq_runtime.load() then a {len(ids)}-token prefill, median of {repeats} "
          "(file hashes stamped after the first launch), seconds")
    cols = ["plan", "verify", "session", "kv", "load", "first", "ttft"]
    print(f"{'variant':<9} " + " ".join(f"{c:>8}" for c in cols))
    for n in names:
        med = {c: statistics.median(r[c] for r in rows[n]) for c in cols}
        print(f"{n:<9} " + " ".join(f"{med[c]:>8.3f}" for c in cols))


def options_table(bundle, manifest, variant, ids, new, repeats, threads):
    import onnxruntime as ort

    from lsaq_runtime.session import Runner

    info = next(v for v in manifest["variants"] if v["name"] == variant)["providers"]["cpu"]
    data = (Path(bundle) / info["graph"]).read_bytes()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    configs = [(lv, pre) for lv in levels for pre in (True, False)]
    create = {c: [] for c in configs}
    decode = {c: [] for c in configs}
    for _ in range(repeats):
        for lv, pre in configs:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = threads
            so.graph_optimization_level = levels[lv]
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        str(bundle))
            if not pre:
                so.add_session_config_entry("session.disable_prepacking", "1")
            t0 = time.perf_counter()
            s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
            create[lv, pre].append(time.perf_counter() - t0)
            r = Runner(s, manifest, "float32", len(ids) + new + 1, "cpu")

            class M:
                forward = staticmethod(lambda i, p, k: r.run(i, p, k))
            _, td = greedy_run(M, ids, new)
            decode[lv, pre].append((new - 1) / td)
            r.close()
    print(f"\n3. Session options, variant {variant}: creation seconds and decode tok/s, median "
          f"of {repeats}")
    print(f"{'optimization':<12} {'prepacking':>10} {'create s':>9} {'decode tok/s':>12}")
    for c in configs:
        print(f"{c[0]:<12} {'on' if c[1] else 'off':>10} {statistics.median(create[c]):>9.3f} "
              f"{statistics.median(decode[c]):>12.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--variants", nargs="+", default=None,
                    help="default: fp16, int8, the middle mix and int4")
    ap.add_argument("--prompt", type=int, default=512, help="prompt tokens (prefill)")
    ap.add_argument("--new", type=int, default=128, help="generated tokens (decode)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--options-variant", default="int4", help="variant for table 3 ('' skips it)")
    args = ap.parse_args()

    threads = args.threads or physical_cores()
    manifest = lsaq_runtime.load_manifest(args.bundle)
    all_names = [v["name"] for v in manifest["variants"]]
    names = args.variants or list(dict.fromkeys(
        ["fp16", "int8", all_names[len(all_names) // 2], all_names[-1]]))
    probe = lsaq_runtime.load(args.bundle, variant=names[0], device="cpu", context=16,
                              threads=threads)
    source = TEXT.read_text(encoding="utf-8") if TEXT.is_file() else "The quick brown fox. " * 5000
    ids = probe.codec.encode(source[: args.prompt * 10])[: args.prompt]
    probe.close()
    print(f"CPU provider, {threads} threads ({os.cpu_count()} logical CPUs), onnxruntime "
          f"{__import__('onnxruntime').__version__}, bundle {args.bundle}")
    speed_table(args.bundle, manifest, names, ids, args.new, args.repeats, threads,
                memory_bandwidth(threads))
    launch_table(args.bundle, names, ids, args.repeats, threads)
    if args.options_variant:
        options_table(args.bundle, manifest, args.options_variant, ids, args.new, args.repeats,
                      threads)


if __name__ == "__main__":
    main()
