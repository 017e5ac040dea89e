"""LSAQ against its peers on the same model, in one run (a benchmark, not a test).

    pip install -e ".[compile,bench]"   (llama-cpp-python builds from source; see docs/usage.md)
    python benchmarks/bench_peers.py [--quick] [--workdir /tmp/lsaq-peers]

Engines, all on the CPU with the same thread count, fed the same 512 prompt tokens and made to
generate exactly 128 tokens greedily (end-of-text ignored):
  - lsaq: this project's bundle through lsaq_runtime (fp16, int8, int4 and a mix);
  - llama.cpp through llama-cpp-python: F16, Q8_0, Q4_0, Q4_K_M GGUFs made from an F16
    conversion of the same float weights with llama.cpp's own converter (from the package's
    sdist) and quantizer;
  - onnxruntime-genai: its model builder's int8 and int4 CPU models from the same Hugging Face
    folder;
  - transformers, float32.
The float weights are those of the default model (SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF
and dequantized), saved once as a Hugging Face folder that every engine starts from.
Engines run interleaved, round after round; the table gives medians. Decode is also given as
bytes of weights read per second against this machine's measured memory read bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime")]
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
LLAMA_CPP_PYTHON = "0.3.36"

import lsaq_runtime  # noqa: E402
from bench_speed import greedy_run, memory_bandwidth  # noqa: E402  (same folder)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    log(" ".join(map(str, cmd)))
    subprocess.run(cmd, check=True, **kw)


# ------------------------------------------------------------------------------- artifacts
def hf_folder(work: Path, model: str | None) -> Path:
    """The float weights as a Hugging Face folder (safetensors), the common starting point."""
    out = work / "hf"
    if (out / "config.json").is_file():
        return out
    from safetensors.numpy import save_file

    from lsaq_compile.model_source import open_model

    # transformers refuses to save a model it read from GGUF, so write the folder from the
    # compiler's own reader (the same dequantized floats every LSAQ build starts from).
    src = open_model(model)
    log(f"dequantizing {src.path.name} into a Hugging Face folder")
    tmp = work / "hf.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    src.save_tokenizer(tmp)  # first: it keeps only tokenizer files in the folder
    src.spec.to_hf_config().save_pretrained(tmp)
    save_file(hf_tensors(src), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.rename(out)
    return out


def hf_tensors(src) -> dict:
    """Every tensor of the model under its Hugging Face name: the family's own (Gemma's four
    norms a layer, q/k norms, biases), and fused linears fused again for families whose
    checkpoints store them so (Phi-3's qkv_proj, gate_up_proj)."""
    out = {n: src.tensor(n) for n in ("model.embed_tokens.weight", "model.norm.weight",
                                      "lm_head.weight") if src.has_tensor(n)}
    fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    for i in range(src.spec.num_layers):
        t = src.layer_tensors(i)
        if src.spec.family.fused_linears:
            for name, members in fused.items():
                t[f"{name}.weight"] = np.concatenate([t.pop(f"{m}.weight") for m in members])
        out.update({f"model.layers.{i}.{n}": v for n, v in t.items()})
    return out


def lsaq_bundle(work: Path, hf: Path) -> Path:
    out = work / "lsaq"
    if (out / "manifest.json").is_file():
        return out
    run([str(Path(sys.executable).with_name("lsaq-compile")), "build", str(hf), "-o", str(out),
         "--force"])
    return out


def llama_ggufs(work: Path, hf: Path) -> dict[str, Path]:
    """F16 by llama.cpp's converter, then Q8_0 / Q4_0 / Q4_K_M by its quantizer."""
    import llama_cpp

    out = {p: work / f"model-{p}.gguf" for p in ("F16", "Q8_0", "Q4_0", "Q4_K_M")}
    if not out["F16"].is_file():
        sdist = work / "sdist"
        conv = sdist / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        if not (conv / "convert_hf_to_gguf.py").is_file():
            run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                 "-d", str(sdist), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"])
            with tarfile.open(next(sdist.glob("*.tar.gz"))) as t:
                t.extractall(sdist, filter="data")
        env = {**os.environ, "PYTHONPATH": str(conv / "gguf-py")}
        run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f16",
             "--outfile", str(out["F16"])], env=env)
    ftypes = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
              "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}
    for name, ftype in ftypes.items():
        if out[name].is_file():
            continue
        log(f"llama.cpp quantize F16 -> {name}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(str(out["F16"]).encode(), str(out[name]).encode(),
                                            params)
        if rc != 0:
            raise SystemExit(f"llama_model_quantize to {name} failed ({rc})")
    return out


def genai_models(work: Path, hf: Path, threads: int) -> dict[str, Path]:
    out = {}
    for p in ("int8", "int4"):
        d = work / f"genai-{p}"
        if not (d / "genai_config.json").is_file():
            run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                 str(d), "-p", p, "-e", "cpu", "-c", str(work / "genai-cache")])
        cfg_path = d / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        cfg_path.write_text(json.dumps(cfg, indent=1))
        out[p] = d
    return out


# ------------------------------------------------------------------------------- engines
class Engine:
    """generate(ids, n) -> (seconds to the first new token, seconds for all n)."""
    engine = precision = ""
    weight_bytes = 0
    read_bytes = 0  # weight bytes a decode step reads (memory-bound estimate)


class Lsaq(Engine):
    def __init__(self, bundle: Path, variant: str, context: int, threads: int):
        self.engine, self.precision = "lsaq", variant
        self.m = lsaq_runtime.load(bundle, variant=variant, device="cpu", context=context,
                                   threads=threads)
        info = next(v for v in self.m.manifest["variants"] if v["name"] == variant)
        self.weight_bytes = info["providers"]["cpu"]["weight_bytes"]
        self.avg_bits = info["avg_bits"]
        self.read_bytes = info["providers"]["cpu"]["resident_bytes"]

    def generate(self, ids, n):
        prefill, decode = greedy_run(self.m, ids, n)
        return prefill, prefill + decode


class LlamaCpp(Engine):
    BITS = {"F16": 16.0, "Q8_0": 8.5, "Q4_0": 4.5, "Q4_K_M": 4.85}

    def __init__(self, path: Path, precision: str, context: int, threads: int):
        from llama_cpp import Llama

        self.engine, self.precision = "llama.cpp", precision
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.weight_bytes = path.stat().st_size
        self.read_bytes = self.weight_bytes
        self.avg_bits = self.BITS[precision]

    def generate(self, ids, n):
        # reset() empties the token history: otherwise generate() reuses the cached prompt
        # prefix of the previous round and the prefill is not measured.
        self.llm.reset()
        t0 = time.perf_counter()
        t1, count = None, 0
        for _ in self.llm.generate(ids, top_k=1, temp=0.0, reset=True):
            count += 1
            if t1 is None:
                t1 = time.perf_counter()
            if count == n:
                break
        return t1 - t0, time.perf_counter() - t0


class LsaqExport(LlamaCpp):
    """An LSAQ variant exported to GGUF (lsaq-compile export) and run by llama.cpp."""

    def __init__(self, bundle: Path, variant: str, work: Path, context: int, threads: int):
        from llama_cpp import Llama

        from lsaq_compile.export_gguf import export_gguf

        path = work / f"lsaq-export-{variant}.gguf"
        export_gguf(bundle, variant, path, force=True, modelfile=False)
        self.engine, self.precision = "llama.cpp", f"lsaq:{variant}"
        self.llm = Llama(model_path=str(path), n_ctx=context, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.weight_bytes = self.read_bytes = path.stat().st_size
        info = next(v for v in lsaq_runtime.load_manifest(bundle)["variants"] if v["name"] == variant)
        self.avg_bits = info["avg_bits"]


class Genai(Engine):
    def __init__(self, path: Path, precision: str, context: int):
        import onnxruntime_genai as og

        self.og = og
        self.engine, self.precision = "onnxruntime-genai", precision
        self.model = og.Model(str(path))
        self.context = context
        self.weight_bytes = sum(f.stat().st_size for f in path.glob("model.onnx*"))
        self.read_bytes = self.weight_bytes
        self.avg_bits = {"int8": 8.5, "int4": 4.5}[precision]

    def generate(self, ids, n):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n,
                                  do_sample=False)
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray(ids, np.int32))
        gen.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(n - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        del gen
        return t1 - t0, t2 - t0


class Transformers(Engine):
    def __init__(self, hf: Path, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.engine, self.precision = "transformers", "fp32"
        self.model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
        params = {p.data_ptr(): p.numel() * p.element_size() for p in self.model.parameters()}
        self.weight_bytes = self.read_bytes = sum(params.values())
        self.avg_bits = 32.0

    def generate(self, ids, n):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(torch.tensor([ids]), use_cache=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            tok = out.logits[0, -1].argmax()
            for _ in range(n - 1):
                out = self.model(tok.view(1, 1), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[0, -1].argmax()
        return t1 - t0, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--workdir", default="/tmp/lsaq-peers")
    ap.add_argument("--quick", action="store_true", help="5 rounds, fewer LSAQ variants")
    ap.add_argument("--repeats", type=int, default=None, help="rounds (default 7; --quick 5)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--skip", nargs="*", default=[], help="engines to leave out")
    ap.add_argument("--export", action="store_true",
                    help="also run each LSAQ variant's GGUF export (lsaq-compile export) in llama.cpp")
    ap.add_argument("--bundle", default=None, help="an existing LSAQ bundle of the same model "
                    "[default: build one from the float weights in the workdir]")
    args = ap.parse_args()
    from lsaq_runtime.probe import physical_cores
    threads = args.threads or physical_cores()
    repeats = args.repeats or (5 if args.quick else 7)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    hf = hf_folder(work, args.model)
    bundle = Path(args.bundle) if args.bundle else lsaq_bundle(work, hf)
    manifest = lsaq_runtime.load_manifest(bundle)
    names = [v["name"] for v in manifest["variants"]]
    mix = names[len(names) // 2]
    lsaq_variants = ["fp16", "int8", "int4"] + ([] if args.quick else [mix])
    context = args.prompt + args.new + 8
    engines: list[Engine] = [Lsaq(bundle, v, context, threads) for v in lsaq_variants]
    if args.export and "llama.cpp" not in args.skip:
        engines += [LsaqExport(bundle, v, work, context, threads) for v in lsaq_variants]
    if "llama.cpp" not in args.skip:
        ggufs = llama_ggufs(work, hf)
        engines += [LlamaCpp(p, name, context, threads) for name, p in ggufs.items()]
    if "onnxruntime-genai" not in args.skip:
        engines += [Genai(p, name, context) for name, p in genai_models(work, hf, threads).items()]
    if "transformers" not in args.skip:
        engines.append(Transformers(hf, threads))

    ids = engines[0].m.codec.encode(TEXT.read_text(encoding="utf-8")[: args.prompt * 10])[: args.prompt]
    if len(ids) < args.prompt:
        raise SystemExit("the prompt text is too short")
    log(f"{len(engines)} engines loaded; {repeats} interleaved rounds")
    prefill = {id(e): [] for e in engines}
    decode = {id(e): [] for e in engines}
    for e in engines:  # warm-up: first runs allocate and page weights in
        e.generate(ids, 4)
    for r in range(repeats):
        for e in engines:
            tf, tt = e.generate(ids, args.new)
            prefill[id(e)].append(args.prompt / tf)
            decode[id(e)].append((args.new - 1) / (tt - tf))
        log(f"round {r + 1}/{repeats} done")
    bw = memory_bandwidth(threads)

    ref = {e.precision: statistics.median(decode[id(e)]) for e in engines if e.engine == "llama.cpp"}
    ref_bits = {p: LlamaCpp.BITS[p] for p in ref if p in ("F16", "Q8_0", "Q4_0")}

    def nearest(bits):
        return min(ref_bits, key=lambda p: abs(ref_bits[p] - bits)) if ref_bits else None

    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"{threads} threads; onnxruntime {__import__('onnxruntime').__version__}")
    print(f"{args.prompt}-token prompt (WikiText-2), {args.new} new tokens greedy, median of "
          f"{repeats} interleaved rounds; memory read bandwidth {bw / 1e9:.1f} GB/s "
          f"(numpy, {threads} threads); total {time.perf_counter() - t_start:.0f}s")
    print(f"{'engine':<18} {'precision':<9} {'weight MiB':>10} {'prefill tok/s':>13} "
          f"{'decode tok/s':>12} {'vs llama.cpp':>16} {'GB/s read':>9} {'of bw':>6}")
    for e in engines:
        p, d = statistics.median(prefill[id(e)]), statistics.median(decode[id(e)])
        near = nearest(e.avg_bits)
        vs = f"{d / ref[near]:.2f}x {near}" if near else "-"
        read = e.read_bytes * d
        print(f"{e.engine:<18} {e.precision:<9} {e.weight_bytes / 2**20:>10.1f} {p:>13.0f} "
              f"{d:>12.1f} {vs:>16} {read / 1e9:>9.2f} {read / bw:>6.0%}")


if __name__ == "__main__":
    main()
