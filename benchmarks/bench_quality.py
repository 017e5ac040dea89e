"""Perplexity against weight bytes: LSAQ bundles next to llama.cpp's quantization types, on the
same WikiText-2 token windows (a benchmark, not a test).

    pip install -e ".[compile,bench]"   (llama-cpp-python builds from source; see README)
    python benchmarks/bench_quality.py --bundle default=/tmp/qb/default --bundle paper=/tmp/qb/paper

llama.cpp side: F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_1, Q4_0 GGUFs of the default model
(SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF and dequantized), made as bench_peers.py makes
them: an F16 conversion of the same float weights by llama.cpp's own converter, then llama.cpp's
quantizer. Each is run through llama-cpp-python on exactly the windows `lsaq-compile eval` scores
(non-overlapping windows of the bundle's tokenizer's ids from the text's start; no BOS, no
llama.cpp tokenization), logits at every position, KV cache emptied between windows, and the
NLL computed by lsaq_compile.evaluate.window_nll. Results are cached in the workdir, keyed by
the GGUF file and the windows, so a rerun with other bundles only evaluates the bundles.

LSAQ side: every variant of every --bundle, through lsaq_compile.evaluate's ONNX path (the
runtime users run, CPU graph). A perplexity already recorded in the bundle's manifest with the
same text, seq_len and windows (by `lsaq-compile eval` or the study) is reused; a new one is
recorded there as `lsaq-compile eval` records it.

Bytes: bits per decoder-linear weight = 8 x bytes stored for the decoder layers' seven linear
weights (q, k, v, o, gate, up, down; scales included) / their number of weights. For a GGUF from
its tensors (GGUFReader); for LSAQ the variant's avg_bits in manifest.json (the same definition).
Outputs a table on stdout and quality_per_byte.{json,png,md} in --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import bench_peers as peers  # noqa: E402  (same folder; puts the repo and runtime on sys.path)
from bench_peers import log  # noqa: E402

REPO = peers.REPO
DEFAULT_TEXT = peers.TEXT
DEFAULT_OUT = REPO / "docs" / "results" / "smollm2"
LLAMA_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_1", "Q4_0")
DECODER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
_LINEAR = re.compile(r"^blk\.(\d+)\.(" + "|".join(DECODER_LINEARS) + r")\.weight$")
CACHE = "llama_cpp_perplexity.json"
MIB = 2 ** 20


# ------------------------------------------------------------------------------- bytes
def gguf_bytes(path: str | Path) -> dict:
    """Byte accounting of a GGUF: its decoder-layer linear weights (bits per weight, types per
    projection), all tensors, the file, and the types of the token embedding and output."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    lin_bytes = lin_params = total = 0
    types: dict[str, Counter] = {p: Counter() for p in DECODER_LINEARS}
    embd = out = None
    for t in r.tensors:
        total += int(t.n_bytes)
        m = _LINEAR.match(t.name)
        if m:
            lin_bytes += int(t.n_bytes)
            lin_params += int(t.n_elements)
            types[m.group(2)][t.tensor_type.name] += 1
        elif t.name == "token_embd.weight":
            embd = t.tensor_type.name
        elif t.name == "output.weight":
            out = t.tensor_type.name
    if not lin_params:
        raise ValueError(f"{path}: no decoder-layer linear weights (blk.N.attn_q.weight, ...)")
    return {"decoder_linear_bytes": lin_bytes, "decoder_linear_params": lin_params,
            "bits_per_decoder_linear_weight": 8.0 * lin_bytes / lin_params,
            "tensor_bytes": total, "file_bytes": Path(path).stat().st_size,
            "linear_types": {p: dict(c) for p, c in types.items() if c},
            "token_embd": embd, "output": out or "tied (token_embd)"}


def type_summary(linear_types: dict[str, dict]) -> str:
    """'Q5_0 x166, Q6_K x14, ...' over all decoder linears."""
    c = Counter()
    for per in linear_types.values():
        c.update(per)
    return ", ".join(f"{t} x{n}" for t, n in c.most_common())


def decoder_linear_params(model: dict) -> int:
    """Weights of all decoder layers' seven linear projections, from a manifest's model."""
    h, hd = model["hidden_size"], model["head_dim"]
    per = h * model["num_attention_heads"] * hd * 2 + h * model["num_key_value_heads"] * hd * 2 \
        + 3 * h * model["intermediate_size"]
    return per * model["num_layers"]


# ------------------------------------------------------------------------------- llama.cpp
def make_ggufs(work: Path, model: str | None, types: list[str]) -> dict[str, Path]:
    """bench_peers' F16 / Q8_0 / Q4_0 / Q4_K_M, and the other types by the same quantizer."""
    import llama_cpp

    hf = peers.hf_folder(work, model)
    out = peers.llama_ggufs(work, hf)
    for name in types:
        if name in out:
            continue
        path = work / f"model-{name}.gguf"
        if not path.is_file():
            log(f"llama.cpp quantize F16 -> {name}")
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
            params.nthread = 2
            tmp = path.with_suffix(".tmp")
            if llama_cpp.llama_model_quantize(str(out["F16"]).encode(), str(tmp).encode(), params):
                raise SystemExit(f"llama_model_quantize to {name} failed")
            tmp.rename(path)
        out[name] = path
    return {t: out[t] for t in types}


def llama_logits_fn(path: Path, seq_len: int, threads: int):
    """ids -> logits [S, vocab] from llama.cpp: the ids go in as they are, one batch, logits at
    every position, an empty KV cache each call."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=seq_len, n_batch=seq_len, n_ubatch=seq_len,
                logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)

    def fn(ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        llm.reset()  # n_tokens = 0: eval() first removes every cached position
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], np.float32)

    fn.llm = llm
    return fn


def windows_key(tw) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(tw.windows, np.int64).tobytes()).hexdigest()


def llama_results(ggufs: dict[str, Path], tw, threads: int, work: Path, progress) -> dict:
    """Perplexity and bytes of each GGUF on the windows (cached in work/CACHE), and how many
    came from the cache."""
    import llama_cpp

    from lsaq_compile import evaluate as ev

    cache_path = work / CACHE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    wk = windows_key(tw)
    out, cached = {}, 0
    for name, path in ggufs.items():
        st = path.stat()
        key = "|".join(map(str, (name, st.st_size, st.st_mtime_ns, tw.sha256, tw.seq_len,
                                 len(tw.windows), wk, llama_cpp.__version__)))
        if key not in cache:
            t0 = time.perf_counter()
            fn = llama_logits_fn(path, tw.seq_len, threads)
            r = ev.perplexity(fn, tw, progress=progress(f"llama.cpp {name}"))
            fn.llm.close()
            cache[key] = {"type": name, "file": str(path), "perplexity": r["perplexity"],
                          "nll": r["nll"], "tokens": r["tokens"], "windows": r["windows"],
                          "per_window_nll": r["per_window_nll"],
                          "seconds": round(time.perf_counter() - t0, 1),
                          "llama_cpp_python": llama_cpp.__version__, **gguf_bytes(path)}
            tmp = cache_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(cache_path)
        else:
            log(f"llama.cpp {name}: perplexity {cache[key]['perplexity']:.3f} (cached)")
            cached += 1
        out[name] = cache[key]
    return out, cached


# ------------------------------------------------------------------------------- LSAQ
def lsaq_results(label: str, bundle: Path, text: Path, seq_len: int, windows: int, variants,
                 threads, progress) -> tuple[dict, object]:
    """Every variant's perplexity (recorded or measured and recorded) and bytes."""
    from lsaq_compile import evaluate as ev
    from lsaq_compile.bundle import read_manifest
    from lsaq_compile.study import _recorded

    m = read_manifest(bundle)
    tw = ev.text_windows(text, ev.bundle_codec(bundle, m), seq_len, windows)
    settings = {"seq_len": seq_len, "windows": len(tw.windows)}
    params = decoder_linear_params(m["model"])
    rows, reused = [], 0
    for v in m["variants"]:
        if variants and v["name"] not in variants:
            continue
        e = _recorded(m, v["name"], "onnx", tw.sha256, settings, need="value")
        if e is not None:
            reused += 1
            log(f"{label} {v['name']}: perplexity {e['value']:.3f} (recorded in the manifest)")
        else:
            t0 = time.perf_counter()
            fn = ev.onnx_logits_fn(bundle, m, v["name"], threads=threads, context=seq_len)
            r = ev.perplexity(fn, tw, progress=progress(f"{label} {v['name']}"))
            if fn.model is not None:
                fn.model.close()
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            e = {"variant": v["name"], "provider": "cpu", "engine": "onnx", "created": now,
                 "kind": "perplexity", "data": tw.source, "data_sha256": tw.sha256,
                 "settings": settings, "value": r["perplexity"], "tokens": r["tokens"],
                 "per_window_nll": r["per_window_nll"]}
            ev.record_evaluations(bundle, [e])
            m.setdefault("evaluations", []).append(e)
            log(f"{label} {v['name']}: perplexity {e['value']:.3f} "
                f"({time.perf_counter() - t0:.0f}s, recorded)")
        cpu = v["providers"].get("cpu", {})
        rows.append({"variant": v["name"], "layer_counts": v["layer_counts"],
                     "bits_per_decoder_linear_weight": v["avg_bits"],
                     "decoder_linear_bytes": v["avg_bits"] * params / 8,
                     "tensor_bytes": cpu.get("weight_bytes", v.get("weight_bytes")),
                     "weight_bytes_float_head": v.get("weight_bytes"),
                     "lm_head": cpu.get("lm_head"), "accuracy_level": cpu.get("accuracy_level"),
                     "perplexity": e["value"], "tokens": e.get("tokens"),
                     "per_window_nll": e.get("per_window_nll")})
    info = {"path": str(bundle), "quantization": m["quantization"],
            "metric": m.get("scores", {}).get("metric"), "model": m["model"]["name"],
            "model_source": m["model"].get("source"), "windows_sha256": windows_key(tw),
            "reused": reused, "variants": rows}
    return info, tw


# ------------------------------------------------------------------------------- report
def nearest_at_or_above(bits: float, llama: dict) -> str | None:
    """The llama.cpp type with the fewest decoder-linear bytes that has at least `bits`."""
    ok = [(r["bits_per_decoder_linear_weight"], n) for n, r in llama.items()
          if r["bits_per_decoder_linear_weight"] >= bits - 1e-9]
    return min(ok)[1] if ok else None


def scheme_name(q: dict) -> str:
    """'channel-sym', 'g32-asym', ... and the INT4 clipping when there is one."""
    kind = f"g{q.get('group_size')}" if q.get("scheme") == "group" else q.get("scheme")
    clip = q.get("clip") or "none"
    return f"{kind}-{'sym' if q.get('symmetric', True) else 'asym'}" + \
        ("" if clip == "none" else f", clip {clip}")


# Which quantizers a source's shipped grid flatters: weights dequantized from a block format lie
# exactly on that format's grid, and a quantizer of the same shape finds it again. Per source
# type of the decoder linears: the llama.cpp types and the LSAQ INT4 shapes (scheme, group,
# symmetric) that share its grid. Q5_*'s 31 steps do not align with a 4-bit grid's 15, and a
# per-channel INT8 row scale is not a 32-block grid.
FLATTERS = {
    "Q4_1": {"llama": ("Q4_1", "Q4_K"), "lsaq": {("group", 32, False)}},
    "Q4_0": {"llama": ("Q4_0", "Q4_1", "Q4_K"), "lsaq": {("group", 32, True), ("group", 32, False)}},
    "Q4_K": {"llama": ("Q4_K",), "lsaq": {("group", 32, False)}},
    "Q5_0": {"llama": ("Q5_0", "Q5_1", "Q5_K"), "lsaq": set()},
    "Q5_1": {"llama": ("Q5_1", "Q5_K"), "lsaq": set()},
    "Q5_K": {"llama": ("Q5_K",), "lsaq": set()},
    "Q6_K": {"llama": ("Q6_K",), "lsaq": set()},
    "Q8_0": {"llama": ("Q8_0",), "lsaq": set()},
}
# The decoder-linear tensor types of the source model (read from its file by main()).
SOURCE_TYPES: set[str] = set()


def source_linear_types(model) -> dict[str, int]:
    """{GGUF type: tensors} of the source model's decoder linears; {} for float checkpoints."""
    from lsaq_compile.model_source import open_model

    src = open_model(model)
    if src.kind != "gguf":
        return {}
    out: dict[str, int] = {}
    for t in src._reader.tensors:
        if re.match(r"blk\.\d+\.(attn_(q|k|v|qkv|output)|ffn_(gate|up|down))\.weight$", t.name):
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + 1
    return out


def flattered_lsaq(q: dict) -> bool:
    """An INT4 scheme of the shape of a grid the source's weights were shipped on."""
    shape = (q.get("scheme"), q.get("group_size"), bool(q.get("symmetric", True)))
    return any(shape in FLATTERS.get(t, {}).get("lsaq", ()) for t in SOURCE_TYPES)


def flattered_gguf(r: dict) -> bool:
    types = {t for per in r["linear_types"].values() for t in per}
    return any(t in FLATTERS.get(s, {}).get("llama", ()) for s in SOURCE_TYPES for t in types)


def source_caveat() -> str:
    if not SOURCE_TYPES:
        return ""
    types = ", ".join(sorted(SOURCE_TYPES))
    return (f"**Caveat.** The source's decoder linears are dequantized from {types}, so they lie on "
            "that grid; quantizers of the same shape find it again, which flatters them (marked † "
            "below). The float weights are not those of the original BF16 model.")


GRID_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def grid_check(hf: Path, work: Path) -> dict:
    """Relative RMS error (||dequant(quant(w)) - w|| / ||w|| over every decoder linear) of
    llama.cpp's reference block quantizers (gguf-py's numpy ports) on the float weights, rounded
    to F16 first as the F16 GGUF holds them: how far each block grid is from the weights' own."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from safetensors import safe_open

    f = hf / "model.safetensors"
    st = f.stat()
    key = f"{st.st_size}|{st.st_mtime_ns}"
    cache_path = work / "grid_check.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if key in cache:
        return cache[key]
    log("grid check: requantizing the float weights with gguf-py's block quantizers")
    num, den = dict.fromkeys(GRID_TYPES, 0.0), 0.0
    with safe_open(str(f), "numpy") as sf:
        for name in sf.keys():
            if not re.search(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$", name):
                continue
            x = sf.get_tensor(name).astype(np.float32)
            x16 = x.astype(np.float16).astype(np.float32)
            den += float(np.square(x, dtype=np.float64).sum())
            for t in GRID_TYPES:
                qt = GGMLQuantizationType[t]
                y = dequantize(quantize(x16, qt), qt)
                num[t] += float(np.square(y - x, dtype=np.float64).sum())
    cache[key] = {t: math.sqrt(num[t] / den) for t in GRID_TYPES}
    cache_path.write_text(json.dumps(cache, indent=1))
    return cache[key]


def paired(a: list[float] | None, b: list[float] | None) -> tuple[float, float] | None:
    """Perplexity of a over b in percent and one standard error of it, from the two runs'
    per-window mean NLLs on the same windows (equal token counts per window)."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    m, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    return 100 * math.expm1(m), 100 * math.exp(m) * se


def comparisons(bundles: dict, llama: dict) -> list[dict]:
    out = []
    for label, b in bundles.items():
        for r in b["variants"]:
            n = nearest_at_or_above(r["bits_per_decoder_linear_weight"], llama)
            out.append({"bundle": label, "variant": r["variant"],
                        "bits": r["bits_per_decoder_linear_weight"], "perplexity": r["perplexity"],
                        "llama_type": n,
                        "llama_bits": llama[n]["bits_per_decoder_linear_weight"] if n else None,
                        "llama_perplexity": llama[n]["perplexity"] if n else None,
                        "lsaq_not_worse": (r["perplexity"] <= llama[n]["perplexity"]) if n else None,
                        "paired_pct": paired(r.get("per_window_nll"),
                                             llama[n].get("per_window_nll")) if n else None})
    return out


def table_rows(bundles: dict, llama: dict) -> list[list[str]]:
    ref_llama = llama.get("F16", {}).get("perplexity")
    rows = []

    def delta(p, ref):
        return f"{p - ref:+.3f} ({100 * (p / ref - 1):+.1f}%)" if ref else "-"

    for name, r in sorted(llama.items(), key=lambda kv: -kv[1]["bits_per_decoder_linear_weight"]):
        rows.append(["llama.cpp", name + (" †" if flattered_gguf(r) else ""), f"{r['bits_per_decoder_linear_weight']:.3f}",
                     f"{r['decoder_linear_bytes'] / MIB:.1f}", f"{r['tensor_bytes'] / MIB:.1f}",
                     f"{r['token_embd']}/{'tied' if r['output'].startswith('tied') else r['output']}",
                     f"{r['perplexity']:.3f}", delta(r["perplexity"], ref_llama)])
    for label, b in bundles.items():
        fp16 = next((r["perplexity"] for r in b["variants"] if r["variant"] == "fp16"), ref_llama)
        for r in sorted(b["variants"], key=lambda r: -r["bits_per_decoder_linear_weight"]):
            rows.append([f"lsaq:{label}" + (" †" if flattered_lsaq(b["quantization"]) else ""),
                         r["variant"], f"{r['bits_per_decoder_linear_weight']:.3f}",
                         f"{r['decoder_linear_bytes'] / MIB:.1f}",
                         f"{r['tensor_bytes'] / MIB:.1f}" if r["tensor_bytes"] else "-",
                         f"f16/{r['lm_head'] or '-'}", f"{r['perplexity']:.3f}",
                         delta(r["perplexity"], fp16)])
    return rows


HEAD = ["ladder / engine", "variant / type", "bits/dl-weight", "dl MiB", "total MiB", "embd/out",
        "perplexity", "Δ vs FP16"]


def text_table(rows) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(HEAD, *rows)]
    line = lambda r: "  ".join(str(x).ljust(n) if i < 2 or i == 5 else str(x).rjust(n)
                               for i, (x, n) in enumerate(zip(r, w)))
    return "\n".join([line(HEAD), line(["-" * n for n in w])] + [line(r) for r in rows])


def md_table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def plot(bundles: dict, llama: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    fp16 = next((r["perplexity"] for b in bundles.values() for r in b["variants"]
                 if r["variant"] == "fp16"), llama.get("F16", {}).get("perplexity"))
    if fp16:
        f16 = llama.get("F16", {}).get("perplexity")
        ax.axhline(fp16, color="grey", ls=":", lw=1,
                   label=f"FP16 (LSAQ fp16 {fp16:.2f}" + (f", llama.cpp F16 {f16:.2f})" if f16 else ")"))
    for label, b in bundles.items():
        pts = sorted((r["bits_per_decoder_linear_weight"], r["perplexity"]) for r in b["variants"]
                     if r["bits_per_decoder_linear_weight"] < 15.99)
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", ms=3 if len(pts) > 12 else 5, lw=1.2,
                    label=f"LSAQ {label} ({scheme_name(b['quantization'])})"
                    + (" †" if flattered_lsaq(b["quantization"]) else ""))
    for name, r in llama.items():
        if r["bits_per_decoder_linear_weight"] >= 15.99:
            continue
        x, y = r["bits_per_decoder_linear_weight"], r["perplexity"]
        ax.plot([x], [y], marker="D", color="C3", ms=7, ls="none",
                label="llama.cpp" if name == next(n for n, q in llama.items()
                                                  if q["bits_per_decoder_linear_weight"] < 15.99)
                else None)
        ax.annotate(name + (" †" if flattered_gguf(r) else ""), (x, y), textcoords="offset points",
                    xytext=(5, 5), fontsize=8, color="C3")
    ax.set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    lo, hi = ax.get_ylim()
    ticks = [t for t in (*range(10, 30, 2), *range(30, 60, 5), *range(60, 200, 20), 200, 300, 500)
             if lo <= t <= hi]
    if len(ticks) >= 3:
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("bits per decoder-linear weight (stored bytes, scales included)")
    ax.set_ylabel("WikiText-2 perplexity (log scale, lower is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    shipped = ", ".join(sorted(SOURCE_TYPES)) or "float"
    ax.set_title("Perplexity against weight bytes, same WikiText-2 windows\n† the shape of the "
                 f"source's shipped grid ({shipped}): flattered", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_sentence(g: dict | None) -> str:
    if not g:
        return ""
    return (" Relative RMS error of llama.cpp's reference quantizers on these float weights (all "
            "decoder linears): " + ", ".join(f"{t} {e:.4f}" for t, e in g.items())
            + (" — Q4_1 gives the weights back exactly" if g.get("Q4_1", 1) < 1e-6 else "")
            + ("; Q5_1, asymmetric too, is no better than the symmetric Q5_0 here (its 31 steps "
               "do not align with the shipped 15)" if g.get("Q5_1", 0) >= g.get("Q5_0", 1) else "")
            + ".")


def markdown(res: dict, rows, comps) -> str:
    llama, bundles, t = res["llama_cpp"]["types"], res["bundles"], res["text"]
    f16 = llama.get("F16", {}).get("perplexity")
    lines = [
        "## Perplexity per byte: LSAQ against llama.cpp",
        "",
        f"Command: `{res['command']}`  ",
        f"Wall time: {res['seconds']:.0f} s on this machine ({res['threads']} threads)"
        + f"; {res['llama_cpp']['cached']} of {len(llama)} llama.cpp results read from the "
        f"workdir's cache, {sum(b['reused'] for b in bundles.values())} of "
        f"{sum(len(b['variants']) for b in bundles.values())} LSAQ perplexities read back from "
        "the bundles' manifests (where an earlier run recorded them); the llama.cpp evaluations "
        f"took {sum(r.get('seconds', 0) for r in llama.values()):.0f} s when measured.",
        "",
        f"Perplexity on the first {t['windows']} non-overlapping windows of {t['seq_len']} tokens of "
        f"`{Path(t['source']).name}` (the windows of `lsaq-compile eval --windows {t['windows']}` "
        f"and of the study), the same token ids fed to both engines; "
        f"llama.cpp through llama-cpp-python {res['llama_cpp']['version']} (CPU, its default F16 KV "
        "cache), LSAQ through its ONNX CPU graphs. llama.cpp's GGUFs are llama.cpp's converter's F16 "
        "of the same float weights, quantized by its own quantizer. bits/dl-weight: bytes stored for "
        "the 7 linear weights of every decoder layer (scales included) per weight; dl MiB those "
        "bytes; total MiB every tensor the evaluated model reads (LSAQ: the CPU graph's, whose "
        "quantized variants keep an INT8 copy of the tied LM head beside the FP16 embedding).",
        "",
        source_caveat() + grid_sentence(res.get("grid_check")),
        "",
        md_table(HEAD, rows),
        "",
    ]
    lin = {n: type_summary(r["linear_types"]) for n, r in llama.items()}
    lines += ["llama.cpp's decoder-linear tensor types (k-quants need rows of 256 weights; this "
              "model's 576-wide rows fall back to other types, so Q*_K labels overstate k-quant use):", ""]
    lines += [f"- {n}: {lin[n]}; token_embd {r['token_embd']}, output {r['output']}"
              for n, r in llama.items()]
    lines += [""]
    for label, b in bundles.items():
        q = b["quantization"]
        flag = (" (†: the shape of the source's shipped grid, flattered)" if flattered_lsaq(q)
                else "")
        lines.append(f"- LSAQ `{label}`: `{b['path']}`, scheme {scheme_name(q)}{flag}, block "
                     f"{q.get('block_size')}, CPU accuracy level {q.get('cpu_accuracy_level')}, "
                     f"LM head {q.get('cpu_lm_head')}; layer order by {b['metric']}.")
    lines += ["", "Each LSAQ point against the llama.cpp type with the fewest decoder-linear bytes "
              "at or above its own:", ""]
    crow = []
    for c in comps:
        verdict = "-" if c["llama_type"] is None else ("yes" if c["lsaq_not_worse"] else "no")
        n = c["llama_type"]
        crow.append([c["bundle"] + (" †" if flattered_lsaq(bundles[c["bundle"]]["quantization"]) else ""),
                     c["variant"], f"{c['bits']:.3f}", f"{c['perplexity']:.3f}",
                     (n or "-") + (" †" if n and flattered_gguf(llama[n]) else ""),
                     f"{c['llama_bits']:.3f}" if n else "-",
                     f"{c['llama_perplexity']:.3f}" if n else "-",
                     "{:+.2f}% ± {:.2f}".format(*c["paired_pct"]) if c["paired_pct"] else "-",
                     verdict])
    lines += [md_table(["bundle", "variant", "bits", "ppl", "llama.cpp type ≥ bits", "its bits",
                        "its ppl", "LSAQ vs it (± 1 se)", "LSAQ ppl ≤ it?"], crow), "",
              "LSAQ vs it: perplexity ratio − 1, with one standard error from the paired "
              f"per-window NLL differences over the {t['windows']} windows.", ""]
    quant = [c for c in comps if c["lsaq_not_worse"] is not None and c["bits"] < 15.99]
    for label in bundles:
        mine = [c for c in quant if c["bundle"] == label]
        if mine:
            wins = [c["variant"] for c in mine if c["lsaq_not_worse"]]
            lines.append(f"- `{label}`: LSAQ's perplexity is at or below llama.cpp's at equal or "
                         f"more decoder-linear bytes for {len(wins)} of its {len(mine)} quantized "
                         "variants" + (f" ({', '.join(wins)})." if wins else "."))
    lines.append("")
    fp = [(label, r["perplexity"]) for label, b in bundles.items() for r in b["variants"]
          if r["variant"] == "fp16"]
    if f16 and fp:
        lines += ["Sanity: llama.cpp F16 " + f"{f16:.3f}" + " against LSAQ fp16 "
                  + ", ".join(f"{p:.3f} ({label}, {100 * (f16 / p - 1):+.2f}%)" for label, p in fp)
                  + ".", ""]
    lines += ["![perplexity vs bits](quality_per_byte.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- main
def parse_bundle(s: str) -> tuple[str, Path]:
    label, sep, path = s.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {s!r}")
    return label, Path(path)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", action="append", type=parse_bundle, default=[], metavar="LABEL=PATH",
                    help="an LSAQ bundle of the same model (repeatable)")
    ap.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT), help="evaluation text (WikiText-2 test)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=16,
                    help="first N windows (the study's 16; `lsaq-compile eval` takes all by default)")
    ap.add_argument("--types", default=",".join(LLAMA_TYPES), help="llama.cpp types (comma list)")
    ap.add_argument("--variants", default=None, help="only these LSAQ variants (comma list)")
    ap.add_argument("--workdir", default="/tmp/lsaq-quality",
                    help="GGUFs and the llama.cpp results cache")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="folder of quality_per_byte.{json,png,md}")
    args = ap.parse_args(argv)
    source_types = source_linear_types(args.model)   # read from the file: what it flatters
    SOURCE_TYPES.clear()
    SOURCE_TYPES.update(source_types)
    from lsaq_runtime.probe import physical_cores

    from lsaq_compile import evaluate as ev
    from lsaq_compile.progress import Progress

    labels = [label for label, _ in args.bundle]
    if len(set(labels)) != len(labels):
        ap.error("bundle labels must differ")
    threads = args.threads or physical_cores()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prog = Progress(False)
    t_start = time.perf_counter()
    variants = set(args.variants.split(",")) if args.variants else None

    bundles, tws = {}, []
    for label, path in args.bundle:
        log(f"LSAQ bundle {label}: {path}")
        info, tw = lsaq_results(label, path, Path(args.text), args.seq_len, args.windows, variants,
                                args.threads, prog.stage)
        bundles[label] = info
        tws.append(tw)
    if len({windows_key(tw) for tw in tws}) > 1:
        raise SystemExit("the bundles' tokenizers give different windows: not comparable")
    if tws:
        tw = tws[0]
    else:
        from lsaq_compile.model_source import open_model

        tw = ev.text_windows(args.text, open_model(args.model).codec(), args.seq_len,
                             args.windows)

    types = [t.strip() for t in args.types.split(",") if t.strip()]
    if "F16" not in types:
        types.insert(0, "F16")
    ggufs = make_ggufs(work, args.model, types)
    grid = grid_check(peers.hf_folder(work, args.model), work)
    llama, cached = llama_results(ggufs, tw, threads, work, prog.stage)

    import llama_cpp

    res = {
        "command": "python benchmarks/bench_quality.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - t_start, "threads": threads,
        "text": {"source": tw.source, "sha256": tw.sha256, "seq_len": tw.seq_len,
                 "windows": len(tw.windows), "tokens_scored": int(len(tw.windows) * (tw.seq_len - 1)),
                 "windows_sha256": windows_key(tw)},
        "definitions": {
            "bits_per_decoder_linear_weight": "8 * bytes of blk.N.{attn_q,attn_k,attn_v,attn_output,"
            "ffn_gate,ffn_up,ffn_down}.weight (LSAQ: the 7 projections' stored weights, scales and "
            "zero points) / their number of weights",
            "tensor_bytes": "GGUF: all tensors; LSAQ: every tensor its CPU graph references",
            "weight_bytes_float_head": "LSAQ: every tensor of the variant with the tied FP16 head "
            "(its CUDA graph's)"},
        "caveat": source_caveat(),
        "source_linear_types": source_types,
        "llama_cpp": {"version": llama_cpp.__version__, "cached": cached,
                      "types": llama},
        "bundles": bundles,
        "grid_check": grid,
    }
    comps = comparisons(bundles, llama)
    res["comparisons"] = comps
    rows = table_rows(bundles, llama)

    (out / "quality_per_byte.json").write_text(json.dumps(res, indent=1))
    plot(bundles, llama, out / "quality_per_byte.png")
    (out / "quality_per_byte.md").write_text(markdown(res, rows, comps))
    print(f"\nWikiText-2 perplexity, first {len(tw.windows)} windows of {tw.seq_len} tokens "
          f"(same ids for every engine); total {res['seconds']:.0f}s")
    print("bits/dl-weight: stored bits per decoder-linear weight (scales included); dl MiB: those "
          "bytes; total MiB: every tensor read")
    print(text_table(rows))
    print(f"\nwritten: {out / 'quality_per_byte.json'}, .png, .md")
    return res


if __name__ == "__main__":
    main()
