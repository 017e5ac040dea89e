"""Build-time quality both ways on one bundle: the graph engine (each variant's CPU graph in
ONNX Runtime) against the streamed engine (stream_quality.py: the stored weights in a float32
torch pass, one layer at a time), on the same held-out windows.

    python benchmarks/bench_quality_engine.py OUT_DIR [--model PATH] [--profile default]
        [--acc0 int8,int4] [--few 4]

Builds MODEL (default: the embedded SmolLM2-135M) into OUT_DIR/bundle with the profile, its
quality measured by the graphs (the held-out windows kept in OUT_DIR/held_out.npy; a bundle
already there is reused), then measures the same bundle streamed and prints a markdown table
with each engine's wall time. --acc0: those variants' CPU graphs again with every MatMulNBits at
accuracy level 0 (float activations), which the streamed pass should equal. --few N: the
streamed pass again on the first N windows only (what build.streamed_quality_samples does), its
KLs and ranking against all windows'.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def build(out: Path, model, profile: str) -> dict:
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.profiles import load_profile
    from lsaq_compile.progress import Progress
    from lsaq_compile.stages import writer

    times = {}
    orig = writer.measure_quality

    def spy(root, m, windows, log):
        np.save(out / "held_out.npy", windows)
        t = time.perf_counter()
        q = orig(root, m, windows, log)
        times["graphs_s"] = time.perf_counter() - t
        return q

    writer.measure_quality = spy
    prof = load_profile(profile)
    prof.build.quality_engine = "graphs"
    t = time.perf_counter()
    build_bundle(model, out / "bundle", profile=prof, progress=Progress(quiet=False))
    times["build_s"] = time.perf_counter() - t
    (out / "times.json").write_text(json.dumps(times))
    return times


def acc0(root: Path, m: dict, windows: np.ndarray, names: list[str]) -> dict:
    """{variant: (perplexity, kl_fp16)} of the CPU graphs with float activations."""
    import onnx
    import onnxruntime as ort
    from lsaq_compile.evaluate import _log_softmax

    def logprobs(name: str, level0: bool) -> list[np.ndarray]:
        v = next(v for v in m["variants"] if v["name"] == name)
        g = onnx.load(str(root / v["providers"]["cpu"]["graph"]), load_external_data=False)
        for n in g.graph.node:
            for a in n.attribute:
                if n.op_type == "MatMulNBits" and a.name == "accuracy_level" and level0:
                    a.i = 0
        path = root / f"_{name}.acc0.onnx"    # beside the store: external data resolves
        onnx.save(g, str(path))
        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        path.unlink()
        mo = m["model"]
        empty = np.zeros((1, mo["num_key_value_heads"], 0, mo["head_dim"]), np.float32)
        inputs = {i.name for i in s.get_inputs()}
        out = []
        for w in windows:
            feed = {"input_ids": w[None].astype(np.int64),
                    "seqlens_k": np.array([len(w) - 1], np.int32),
                    "total_sequence_length": np.array(len(w), np.int32),
                    "num_logits_to_keep": np.array(0, np.int64)}
            feed.update({k: empty for k in inputs if k.startswith("past_key_values")})
            z = s.run([s.get_outputs()[0].name], {k: feed[k] for k in inputs})[0]
            out.append(_log_softmax(z.reshape(len(w), -1)[:-1]))
        return out

    ref = logprobs("fp16", False)
    tokens = windows.shape[0] * (windows.shape[1] - 1)
    res = {}
    for name in names:
        lp = logprobs(name, True)
        nll = -sum(float(l[np.arange(len(w) - 1), w[1:]].sum()) for l, w in zip(lp, windows))
        kl = sum(float((np.exp(r) * (r - l)).sum()) for r, l in zip(ref, lp))
        res[name] = (round(math.exp(nll / tokens), 4), round(kl / tokens, 6))
    return res


def main() -> None:
    from lsaq_compile.model_source import open_model
    from lsaq_compile.stream_quality import streamed_quality

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model")
    ap.add_argument("--profile", default="default")
    ap.add_argument("--acc0", default="", help="variants to run again at accuracy level 0")
    ap.add_argument("--few", type=int, default=0,
                    help="also stream on only the first N windows (build.streamed_quality_samples)"
                         " and compare its ranking by KL with all windows'")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.out / "bundle"
    times = build(args.out, args.model, args.profile) if not (root / "manifest.json").is_file() \
        else json.loads((args.out / "times.json").read_text())
    windows = np.load(args.out / "held_out.npy")
    t = time.perf_counter()
    got = streamed_quality(root, windows, open_model(args.model), print)
    times["streamed_s"] = time.perf_counter() - t
    m = json.loads((root / "manifest.json").read_text())
    level0 = acc0(root, m, windows, [n for n in args.acc0.split(",") if n])
    print(f"\n{windows.shape[0]} windows x {windows.shape[1]} tokens; build {times['build_s']:.0f}s, "
          f"graphs {times['graphs_s']:.0f}s, streamed {times['streamed_s']:.0f}s\n")
    print("| variant | bits/weight | graphs ppl | streamed ppl | graphs KL | streamed KL "
          "| graphs at accuracy 0: ppl, KL |")
    print("|---|---|---|---|---|---|---|")
    for v in m["variants"]:
        g, s = v["quality"], got[v["name"]]
        a = level0.get(v["name"])
        print(f"| {v['name']} | {v['bits_per_weight']:.2f} | {g['perplexity']:.4f} | "
              f"{s['perplexity']:.4f} | {g['kl_fp16']:.6f} | {s['kl_fp16']:.6f} | "
              f"{f'{a[0]:.4f}, {a[1]:.6f}' if a else ''} |")
    if args.few:
        t = time.perf_counter()
        few = streamed_quality(root, windows[:args.few], open_model(args.model), print)
        dt = time.perf_counter() - t
        names = [v["name"] for v in m["variants"]]
        print(f"\nstreamed on the first {args.few} windows ({dt:.0f}s) against all "
              f"{len(windows)} ({times['streamed_s']:.0f}s)\n")
        print(f"| variant | KL, {len(windows)} windows | KL, {args.few} windows | change |")
        print("|---|---|---|---|")
        for n in names:
            a, b = got[n]["kl_fp16"], few[n]["kl_fp16"]
            print(f"| {n} | {a:.5f} | {b:.5f} | {f'{b / a - 1:+.1%}' if a else ''} |")
        same = sorted(names, key=lambda n: got[n]["kl_fp16"]) == \
            sorted(names, key=lambda n: few[n]["kl_fp16"])
        print(f"\nranking by KL from FP16 {'the same' if same else 'DIFFERENT'} on "
              f"{args.few} windows")


if __name__ == "__main__":
    main()
