"""Exported plans, verified by the engines that run them (a benchmark, not a test).

    pip install -e ".[compile,bench,export]"   (llama-cpp-python builds llama.cpp from source)
    python benchmarks/bench_export.py --exact-bundle B_EXACT --bundle B_DEFAULT \
        [--workdir /tmp/lsaq-export] [--out docs/results/smollm2/export.md]

B_EXACT: `lsaq-compile build --profile exact` (float activations in every quantized matmul:
each variant computes exactly its dequantized weights); B_DEFAULT: the default build (fast
kernels). For FP16, INT8, two mixes and all-INT4 of B_EXACT:
  - GGUF: llama-cpp-python loads the export; WikiText-2 perplexity on the same windows as the
    bundle's own (ONNX Runtime, through the runtime users run); greedy text of 32 tokens
    against lsaq-run's, or the first position where they differ with both engines' logits;
  - compressed-tensors: transformers loads the folder; its logits against the compiler's torch
    reference of the plan (evaluate.torch_logits_fn) on one window, and its perplexity;
  - one chat completion through llama-cpp-python's chat handler, which formats with the
    exported tokenizer.chat_template: its prompt against the runtime's, and the greedy reply.
Then one interleaved speed run (prefill and decode tok/s, wall and CPU seconds) of B_DEFAULT's
variants in lsaq-run, their GGUF exports in llama.cpp, and llama.cpp's own Q8_0 / Q4_K_M / Q4_0
(llama.cpp's quantizer on the FP16 export: the same float16 weights), with weight bytes and
perplexity beside each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# llama.cpp's OpenMP threads spin while they wait; on a machine shared with other jobs the
# spinning competes with the work (measured here: 2 threads, 1024 tokens, 69 s wall / 18 s CPU
# spinning, 25 s / 7 s passive). Set before llama.cpp loads; the report says so.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime"), str(Path(__file__).parent)]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
PROMPT = ("The history of the Roman Empire spans more than a thousand years, from the founding "
          "of the city to the fall of Constantinople. In that time")
CHAT = [{"role": "user", "content": "Name three primary colors."}]

import lsaq_runtime  # noqa: E402
from lsaq_compile import evaluate as ev  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cli(*args) -> str:
    cmd = [sys.executable, "-m", "lsaq_compile.cli", *map(str, args)]
    log(" ".join(["lsaq-compile", *map(str, args)]))
    r = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'runtime'}"})
    if r.returncode:
        raise SystemExit(r.stderr)
    return r.stdout


def ladder(manifest: dict) -> list[str]:
    """FP16, INT8, two mixes (a third and two thirds of the way down in bits), all-INT4."""
    vs = sorted(manifest["variants"], key=lambda v: -v.get("bits_per_weight", v["avg_bits"]))
    names = [v["name"] for v in vs]
    # mixes of INT8 and INT4 linears (not a rung that differs from INT8 only in its tables)
    mixes = [v for v in vs if v["name"] not in ("fp16", "int8", "int4") and
             (v["layer_counts"].get("mixed") or (v["layer_counts"]["int8"] and v["layer_counts"]["int4"]))]
    picks = [mixes[len(mixes) // 3], mixes[(2 * len(mixes)) // 3]] if len(mixes) >= 2 else mixes
    out = [n for n in ("fp16", "int8") if n in names] + [v["name"] for v in picks]
    return out + (["int4"] if "int4" in names else [])


# ------------------------------------------------------------------------------ engines
class LlamaLogits:
    """Full-window logits from llama.cpp (llama-cpp-python), for evaluate.perplexity."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, logits_all=True, verbose=False)

    def __call__(self, ids) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        self.llm.reset()
        self.llm.eval(ids)
        out, rows = [], []
        for _ in range(n):
            row = np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)
            tok = int(row.argmax())
            out.append(tok)
            rows.append(row)
            self.llm.eval([tok])
        return out, rows


def lsaq_greedy(bundle: Path, variant: str, ids: list[int], n: int, threads: int):
    m = lsaq_runtime.load(bundle, variant=variant, device="cpu", context=len(ids) + n + 1,
                          threads=threads)
    out, rows = [], []
    logits = m.forward(ids, 0, 1)[-1]
    pos = len(ids)
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        rows.append(np.asarray(logits, np.float32))
        logits = m.forward([tok], pos, 1)[-1]
        pos += 1
    m.close()
    return out, rows


def compare_greedy(a: tuple, b: tuple, decode) -> str:
    """'equal' or the first differing step with both engines' logits of both tokens."""
    (ta, ra), (tb, rb) = a, b
    for i, (x, y) in enumerate(zip(ta, tb)):
        if x != y:
            return (f"differ at token {i + 1}: lsaq-run {decode([x])!r} (logit {ra[i][x]:.3f}, "
                    f"llama.cpp gives it {rb[i][x]:.3f}) vs llama.cpp {decode([y])!r} (logit "
                    f"{rb[i][y]:.3f}, lsaq-run gives it {ra[i][y]:.3f})")
    return f"equal ({len(ta)} tokens)"


# ------------------------------------------------------------------------------ quality
def quality(args, work: Path, threads: int) -> tuple[list[dict], dict]:
    from tokenizers import Tokenizer

    from lsaq_compile.export_compressed import transformers_model

    bundle = Path(args.exact_bundle)
    m = lsaq_runtime.load_manifest(bundle)
    tok_json = bundle / "tokenizer" / "tokenizer.json"
    tw = ev.text_windows(TEXT, ev.bundle_codec(bundle, m), args.seq_len, args.windows)
    tk = Tokenizer.from_file(str(tok_json))
    decode = lambda ids: tk.decode(ids, skip_special_tokens=False)  # noqa: E731
    prompt_ids = tk.encode(PROMPT, add_special_tokens=False).ids
    q = m["quantization"]
    rows = []
    for v in ladder(m):
        info = next(x for x in m["variants"] if x["name"] == v)
        t = info.get("tables") or {}
        r = {"variant": v, "avg_bits": info["avg_bits"],
             "bits_per_weight": info.get("bits_per_weight"),
             "tables": f"{t.get('embed_tokens', 'fp16')} / {t.get('lm_head', 'fp16')}"}
        log(f"{v}: bundle perplexity (ONNX Runtime, exact kernels)")
        fn = ev.onnx_logits_fn(bundle, m, v, threads=threads, context=args.seq_len)
        t0 = time.perf_counter()
        r["ppl_bundle"] = ev.perplexity(fn, tw)["perplexity"]
        fn.close()
        r["t_bundle"] = time.perf_counter() - t0

        g = work / f"exact-{v}.gguf"
        errs = work / f"exact-{v}.errors.json"
        t0 = time.perf_counter()
        r["export_gguf"] = cli("export", bundle, "--variant", v, "--to", "gguf", "-o", g,
                               "--force", "--errors-json", errs, "-q").strip().splitlines()
        r["t_export_gguf"] = time.perf_counter() - t0
        rec = json.loads(errs.read_text())
        q41 = [x["rel_rms"] for x in rec if x["type"] == "Q4_1"]
        r["gguf_types"] = {t: sum(x["type"] == t for x in rec) for t in sorted({x["type"] for x in rec})}
        r["q4_1_err"] = (float(np.median(q41)), float(max(q41))) if q41 else None
        r["gguf_mib"] = g.stat().st_size / 2**20
        log(f"{v}: llama.cpp perplexity")
        ll = LlamaLogits(g, max(args.seq_len, len(prompt_ids) + 40), threads)
        t0 = time.perf_counter()
        r["ppl_llama"] = ev.perplexity(ll, tw)["perplexity"]
        r["t_llama"] = time.perf_counter() - t0
        theirs = ll.greedy(prompt_ids, 32)
        r["greedy"] = compare_greedy(lsaq_greedy(bundle, v, prompt_ids, 32, threads), theirs,
                                     decode)
        r["greedy_text"] = decode(theirs[0])
        del ll

        d = work / f"exact-{v}-ct"
        t0 = time.perf_counter()
        r["export_ct"] = cli("export", bundle, "--variant", v, "--to", "compressed-tensors",
                             "-o", d, "--force", "-q").strip().splitlines()
        r["t_export_ct"] = time.perf_counter() - t0
        import torch

        torch.set_num_threads(threads)
        model, how = transformers_model(d)
        r["ct_load"] = how

        def hf_fn(ids, model=model):
            with torch.no_grad():
                return model(torch.as_tensor(np.asarray(ids, np.int64))[None]).logits[0].float().numpy()

        log(f"{v}: transformers logits vs the torch reference, and perplexity")
        ref = ev.torch_logits_fn(m["model"]["source"]["path"], info["precisions"], q,
                                 tables=info.get("tables"))
        w0 = tw.windows[0]
        a, b = hf_fn(w0), ref(w0)
        r["ct_vs_ref"] = float(np.abs(a - b).max())
        r["ref_scale"] = float(np.abs(b).max())
        del ref
        t0 = time.perf_counter()
        r["ppl_ct"] = ev.perplexity(hf_fn, tw)["perplexity"]
        r["t_ct"] = time.perf_counter() - t0
        del model
        rows.append(r)
        # what is measured so far survives a run cut short
        (work / "quality.partial.json").write_text(json.dumps(rows, indent=1, default=str))
        log(f"{v}: bundle {r['ppl_bundle']:.4f}, llama.cpp {r['ppl_llama']:.4f}, "
            f"transformers {r['ppl_ct']:.4f}; greedy {r['greedy']}")
    chat = chat_check(bundle, work, ladder(m)[1], threads, tk)
    return rows, chat


def chat_check(bundle: Path, work: Path, variant: str, threads: int, tk) -> dict:
    """llama-cpp-python's chat handler formats with the exported template: its prompt tokens
    against the runtime's, and the greedy replies of both."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    g = work / f"exact-{variant}.gguf"
    llm = Llama(model_path=str(g), n_ctx=512, n_threads=threads, verbose=False)
    out = {"variant": variant, "chat_format": llm.chat_format}
    md = llm.metadata
    if "tokenizer.chat_template" not in md:
        return None
    eos = llm._model.token_get_text(llm.token_eos())
    bos = llm._model.token_get_text(llm.token_bos())
    fmt = Jinja2ChatFormatter(md["tokenizer.chat_template"], eos, bos)(messages=CHAT)
    theirs = llm.tokenize(fmt.prompt.encode(), add_bos=bool(md.get("tokenizer.ggml.add_bos_token")
                                                             == "true"), special=True)
    m = lsaq_runtime.load(bundle, variant=variant, device="cpu", context=512, threads=threads)
    ours = m.encode(CHAT, chat=True)
    out["prompt_tokens_equal"] = list(theirs) == list(ours)
    out["prompt"] = fmt.prompt
    resp = llm.create_chat_completion(messages=CHAT, temperature=0.0, top_k=1, max_tokens=48)
    out["llama_reply"] = resp["choices"][0]["message"]["content"]
    out["finish"] = resp["choices"][0]["finish_reason"]
    out["lsaq_reply"] = m.generate(CHAT, max_new_tokens=48, temperature=0.0, chat=True)
    m.close()
    return out


# ------------------------------------------------------------------------------ speed
def speed(args, work: Path, threads: int) -> list[dict]:
    import bench_peers as bp

    bundle = Path(args.bundle)
    m = lsaq_runtime.load_manifest(bundle)
    tw = ev.text_windows(TEXT, ev.bundle_codec(bundle, m), args.seq_len, args.speed_windows)
    names = ladder(m)
    if args.quick:
        names = [n for i, n in enumerate(names) if i in (1, 2, len(names) - 1)]
    context = args.prompt + args.new + 8
    engines = []
    ppl = {}
    for v in names:
        info = next(x for x in m["variants"] if x["name"] == v)
        e = bp.Lsaq(bundle, v, context, threads)
        e.label = f"lsaq-run {v}"
        engines.append(e)
        fn = ev.onnx_logits_fn(bundle, m, v, threads=threads, context=args.seq_len)
        log(f"perplexity lsaq-run {v}")
        ppl[e.label] = ev.perplexity(fn, tw)["perplexity"]
        fn.close()
        g = work / f"default-{v}.gguf"
        cli("export", bundle, "--variant", v, "--to", "gguf", "-o", g, "--force", "-q")
        ex = Exported(g, f"export {v}", context, threads, info["avg_bits"])
        ex.label = f"llama.cpp export {v}"
        engines.append(ex)
        log(f"perplexity {ex.label}")
        ppl[ex.label] = ev.perplexity(LlamaLogits(g, args.seq_len, threads), tw)["perplexity"]
    f16 = work / "default-fp16.gguf"
    if not f16.is_file():
        cli("export", bundle, "--variant", "fp16", "--to", "gguf", "-o", f16, "--force", "-q")
    for name, p in own_quants(f16, work, threads).items():
        e = bp.LlamaCpp(p, name, context, threads)
        e.label = f"llama.cpp own {name}"
        engines.append(e)
        log(f"perplexity {e.label}")
        ppl[e.label] = ev.perplexity(LlamaLogits(p, args.seq_len, threads), tw)["perplexity"]

    ids = engines[0].m.codec.encode(TEXT.read_text(encoding="utf-8")[: args.prompt * 10])[: args.prompt]
    for e in engines:
        e.generate(ids, 4)      # warm-up
    args.speed_load = [os.getloadavg()]
    res = {e.label: {"pre": [], "dec": [], "cpu": [], "wall": []} for e in engines}
    for r in range(args.repeats):
        for e in engines:
            c0, w0 = time.process_time(), time.perf_counter()
            tf, tt = e.generate(ids, args.new)
            res[e.label]["cpu"].append(time.process_time() - c0)
            res[e.label]["wall"].append(time.perf_counter() - w0)
            res[e.label]["pre"].append(args.prompt / tf)
            res[e.label]["dec"].append((args.new - 1) / (tt - tf))
        args.speed_load.append(os.getloadavg())
        log(f"speed round {r + 1}/{args.repeats}, load average {args.speed_load[-1][0]:.1f}")
    rows = []
    for e in engines:
        x = res[e.label]
        rows.append({"engine": e.label, "weight_mib": e.weight_bytes / 2**20,
                     "prefill": statistics.median(x["pre"]), "decode": statistics.median(x["dec"]),
                     "wall_s": statistics.median(x["wall"]), "cpu_s": statistics.median(x["cpu"]),
                     "ppl": ppl[e.label]})
    return rows


def own_quants(f16: Path, work: Path, threads: int) -> dict[str, Path]:
    """llama.cpp's own Q8_0, Q4_K_M and Q4_0 of the model, made by its quantizer
    (llama_model_quantize, as llama-quantize) from the FP16 export: the same float weights
    (the F16 GGUF holds the bundle's float16 tensors), llama.cpp's own choice of types."""
    import llama_cpp

    out = {}
    for name in ("Q8_0", "Q4_K_M", "Q4_0"):
        p = work / f"own-{name}.gguf"
        if not p.is_file():
            log(f"llama.cpp quantize {f16.name} -> {name}")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.nthread = threads
            tmp = p.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params):
                tmp.unlink(missing_ok=True)
                raise SystemExit(f"llama_model_quantize to {name} failed")
            tmp.rename(p)
        out[name] = p
    return out


class Exported:
    """An exported GGUF in llama.cpp (bench_peers.LlamaCpp with the bundle's average bits)."""

    def __init__(self, path: Path, precision: str, context: int, threads: int, avg_bits: float):
        import bench_peers as bp

        self._e = bp.LlamaCpp.__new__(bp.LlamaCpp)
        from llama_cpp import Llama

        self._e.engine, self._e.precision = "llama.cpp", precision
        self._e.llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
        self.weight_bytes = path.stat().st_size
        self.avg_bits = avg_bits

    def generate(self, ids, n):
        return self._e.generate(ids, n)


# ------------------------------------------------------------------------------ report
def report(args, rows, chat, speed_rows, threads, t_total) -> str:
    load = os.getloadavg()
    lines = [
        "# Exported plans, verified by llama.cpp and transformers",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"{threads} threads per engine; shared with other jobs (load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}), so CPU seconds are given beside wall time. "
        f"onnxruntime {__import__('onnxruntime').__version__}, llama-cpp-python "
        f"{__import__('llama_cpp').__version__}, transformers {__import__('transformers').__version__}, "
        f"compressed-tensors {__import__('compressed_tensors').__version__}, gguf "
        f"{__import__('importlib.metadata').metadata.version('gguf')}. Total {t_total / 60:.0f} min.",
        "",
        *([Path(args.preamble).read_text().rstrip(), ""] if args.preamble else []),
        "Commands:",
        "```",
        *(["python benchmarks/bench_export.py " + " ".join(args.quality_argv) + "   # quality"]
          if getattr(args, "quality_argv", None) else []),
        "python benchmarks/bench_export.py " + " ".join(sys.argv[1:]),
        "```",
        "",
        "SmolLM2-135M-Instruct's only published weights here are a Q4_1 GGUF, dequantized: its "
        "floats lie on a 32-wide asymmetric 4-bit grid, which flatters the group-32 asymmetric "
        "INT4 scheme (and llama.cpp's Q4_1-like types) on this model.",
        "",
        f"## Quality: the exact-kernel bundle ({args.exact_bundle}), WikiText-2 test, "
        f"{args.windows} x {args.seq_len} windows",
        "",
        "Perplexity of each variant as the bundle computes it (ONNX Runtime through lsaq-run's "
        "loader), as llama.cpp computes the GGUF export, and as transformers computes the "
        "compressed-tensors export, on the same token windows. Δ: relative to the bundle.",
        "",
        "| variant | avg bits (linears) | bits per weight (model) | tables (embedding / head) "
        "| bundle ppl | GGUF (llama.cpp) ppl | Δ | compressed-tensors "
        "(transformers) ppl | Δ | transformers vs torch reference, max abs logit diff (1 window) "
        "| transformers load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dl = (r["ppl_llama"] / r["ppl_bundle"] - 1) * 100
        dc = (r["ppl_ct"] / r["ppl_bundle"] - 1) * 100
        bpw = r.get("bits_per_weight")
        lines.append(f"| {r['variant']} | {r['avg_bits']:.2f} | "
                     f"{'-' if bpw is None else f'{bpw:.2f}'} | {r.get('tables', 'fp16 / fp16')} | "
                     f"{r['ppl_bundle']:.4f} | "
                     f"{r['ppl_llama']:.4f} | {dl:+.3f}% | {r['ppl_ct']:.4f} | {dc:+.3f}% | "
                     f"{r['ct_vs_ref']:.2e} (logits up to {r['ref_scale']:.1f}) | {r['ct_load']} |")
    lines += ["", "| variant | GGUF MiB | GGUF tensor types | Q4_1 rel. RMS error vs the bundle's "
              "weights (median / max) | export s (GGUF / CT) | greedy 32 tokens, lsaq-run vs llama.cpp |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        e = f"{r['q4_1_err'][0]:.2e} / {r['q4_1_err'][1]:.2e}" if r["q4_1_err"] else "- (exact)"
        t = ", ".join(f"{n} {k}" for k, n in r["gguf_types"].items())
        lines.append(f"| {r['variant']} | {r['gguf_mib']:.1f} | {t} | {e} | "
                     f"{r['t_export_gguf']:.1f} / {r['t_export_ct']:.1f} | {r['greedy']} |")
    lines += ["", f"Greedy prompt: {PROMPT!r}.", ""]
    for r in rows:
        lines.append(f"- {r['variant']} (llama.cpp): {r['greedy_text']!r}")
    if chat:
        lines += ["", "## Chat through llama-cpp-python's chat handler", "",
                f"Variant {chat['variant']}; llama-cpp-python chose chat format "
                f"`{chat['chat_format']}` (the GGUF's tokenizer.chat_template). Messages: {CHAT!r}.",
                f"Prompt tokens of its formatter equal lsaq-run's chat encoding: "
                f"{'yes' if chat['prompt_tokens_equal'] else 'NO'}.", "",
                f"- llama.cpp reply ({chat['finish']}): {chat['llama_reply']!r}",
                f"- lsaq-run reply: {chat['lsaq_reply']!r}", ""]
    if speed_rows:
        ld = getattr(args, "speed_load", None)
        ld = (f"; load average {ld[0][0]:.1f} / {ld[0][1]:.1f} / {ld[0][2]:.1f} at the first "
              f"round, {min(x[0] for x in ld):.1f} to {max(x[0] for x in ld):.1f} (1 min) after "
              f"each" if ld else "")
        lines += [f"## Speed: the default bundle ({args.bundle}) against llama.cpp", "",
                  "llama.cpp's own Q8_0, Q4_K_M and Q4_0: its quantizer (`llama_model_quantize`, "
                  "llama-quantize's function) on the FP16 export, i.e. the same float16 weights "
                  "the bundle was built from, with llama.cpp's own choice of types per tensor. "
                  "Engines run one after another within a round (A B C ... A B C ...); medians "
                  "over rounds. CPU s: process CPU time of the round (all threads), beside its wall "
                  "time: where CPU s is well under threads x wall, the engine waited for the "
                  "machine's other jobs.", "",
                  f"{args.prompt}-token WikiText-2 prompt, {args.new} new tokens greedy, median of "
                  f"{args.repeats} interleaved rounds{ld}, {threads} threads each "
                  f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} for llama.cpp). "
                  f"Perplexity: the first {args.speed_windows} x {args.seq_len} WikiText-2 "
                  "windows, each engine's own logits "
                  "(lsaq-run's default kernels quantize activations to 8 bits per block, as "
                  "llama.cpp does in its quantized matmuls).", "",
                  "| engine | weight MiB | prefill tok/s | decode tok/s | wall s / CPU s a round "
                  "| WikiText-2 ppl |", "|---|---|---|---|---|---|"]
        for s in speed_rows:
            lines.append(f"| {s['engine']} | {s['weight_mib']:.1f} | {s['prefill']:.0f} | "
                         f"{s['decode']:.1f} | {s['wall_s']:.2f} / {s['cpu_s']:.2f} | {s['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exact-bundle", required=True)
    ap.add_argument("--bundle", help="the default-profile bundle for the speed table")
    ap.add_argument("--workdir", default="/tmp/lsaq-export")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="speed: three variants only")
    ap.add_argument("--reuse-quality", action="store_true",
                    help="take the quality section from WORKDIR/quality.json of an earlier run")
    ap.add_argument("--speed-windows", type=int, default=4,
                    help="windows for the speed table's perplexity column")
    ap.add_argument("--preamble", default=None,
                    help="a markdown file placed after the machine line (how the bundles were made)")
    args = ap.parse_args()
    from lsaq_runtime.probe import physical_cores

    threads = args.threads or physical_cores()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    saved = work / "quality.json"
    if args.reuse_quality and saved.is_file():   # e.g. the speed run alone, later
        q = json.loads(saved.read_text())
        rows, chat = q["rows"], q["chat"]
        args.quality_argv = q.get("argv")
    else:
        rows, chat = quality(args, work, threads)
        saved.write_text(json.dumps({"rows": rows, "chat": chat, "argv": sys.argv[1:]},
                                    indent=1, default=str))
    speed_rows = speed(args, work, threads) if args.bundle else []
    text = report(args, rows, chat, speed_rows, threads, time.perf_counter() - t0)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
