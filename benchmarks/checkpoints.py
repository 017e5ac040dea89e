"""Random-weight checkpoints with real models' shapes, and a command's cost measured from outside
(shared by bench_compile.py and bench_export_stream.py).

The shapes are the published configs' (hidden, MLP, heads, KV heads, vocabulary, depth); the
weights are random, so these measure time and memory, never quality. `layers` may be fewer than
the real depth: costs are then measured at two depths and extrapolated per layer.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# From each model's published config.json (Llama 2: 32k vocabulary, MHA up to 13B, GQA at 70B;
# Llama 3: 128k vocabulary, GQA).
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, num_hidden_layers=16,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, num_hidden_layers=32,
                       rope_theta=10000.0, tie_word_embeddings=False),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, num_hidden_layers=32,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, num_hidden_layers=40,
                        rope_theta=10000.0, tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, num_hidden_layers=80,
                        rope_theta=10000.0, tie_word_embeddings=False),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and the vector instructions a build's speed depends on: wall times
    measured on machines that differ here are not comparable (float32 GEMMs and the clipping
    search on AVX2 against AVX-512; bfloat16 is about 200x slower without its instructions)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open(cpuinfo, encoding="utf-8", errors="replace"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        return name
    if not flags:
        return name
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = [f for f in wanted if f in flags]
    missing = [f for f in wanted if f not in flags]
    if not have:
        return f"{name} (none of {'/'.join(wanted)})"
    return f"{name} ({', '.join(have)}" + (f"; no {', '.join(missing)})" if missing else ")")


def layer_linears(shape: dict) -> list[tuple[str, int, int]]:
    """(HF linear, rows, columns) of one decoder layer of `shape`, in checkpoint order."""
    h, ff = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return [("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h), ("mlp.gate_proj", ff, h), ("mlp.up_proj", ff, h),
            ("mlp.down_proj", h, ff)]


def layer_params(shape: dict) -> int:
    return sum(n * k for _, n, k in layer_linears(shape))


def table_params(shape: dict) -> int:
    return shape["vocab_size"] * shape["hidden_size"] * (1 if shape["tie_word_embeddings"] else 2)


def checkpoint(out: Path, shape: dict, layers: int | None = None) -> Path:
    """A float16 safetensors folder of `shape` with `layers` decoder layers (default: all), one
    shard per layer written a tensor group at a time (never the model in memory), and a small
    trained BPE tokenizer over the vocabulary. Reused when already there."""
    from safetensors.numpy import save_file

    sys.path.insert(0, str(REPO / "tests"))
    from factories.models import save_tiny_tokenizer

    layers = layers or shape["num_hidden_layers"]
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    h, v = shape["hidden_size"], shape["vocab_size"]

    def rand(*s):
        return (rng.standard_normal(s, dtype=np.float32) * 0.02).astype(np.float16)

    index = {}

    def shard(name, tensors):
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        index.update({k: name for k in tensors})

    shard("embed.safetensors", {"model.embed_tokens.weight": rand(v, h),
                                "model.norm.weight": np.ones(h, np.float16)})
    if not shape["tie_word_embeddings"]:
        shard("head.safetensors", {"lm_head.weight": rand(v, h)})
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {**{f"{p}.{m}.weight": rand(n, k) for m, n, k in layer_linears(shape)},
             f"{p}.input_layernorm.weight": np.ones(h, np.float16),
             f"{p}.post_attention_layernorm.weight": np.ones(h, np.float16)}
        shard(f"layer-{i:03d}.safetensors", t)
        del t
        log(f"checkpoint layer {i + 1}/{layers}")
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float16",
           "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, **shape, "num_hidden_layers": layers}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    save_tiny_tokenizer(tmp, v)
    tmp.rename(out)
    return out


@dataclass
class Cost:
    rc: int
    wall_s: float
    cpu_s: float                 # user + system of the command and its children
    peak_anon_mib: float         # largest sum of RssAnon over the process tree, sampled
    peak_rss_mib: float          # ru_maxrss of the largest child (file-backed pages included)
    peak_gpu_mib: float | None   # NVML's used memory on the GPU, sampled, minus its idle level
    stderr_tail: str
    stopped: str = ""            # why the harness stopped it, if it did


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _gpu_used() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
        return used / 2**20
    except Exception:   # noqa: BLE001 - no NVML, no GPU: no GPU column
        return None


def measure(cmd: list[str], env: dict | None = None, stop_above_gib: float | None = None,
            every: float = 0.25, log_path: Path | None = None) -> Cost:
    """Run `cmd`, sampling the anonymous memory of its process tree (and GPU memory when NVML
    is there); stop it (SIGKILL to its group) if that passes `stop_above_gib`. `log_path`
    keeps its whole stderr (the build's progress lines: bench_compile's stage table)."""
    gpu0 = _gpu_used()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    tail: list[str] = []
    keep = open(log_path, "w") if log_path else None

    def read() -> None:
        for x in p.stderr:
            tail.append(x)
            del tail[:-40]
            if keep:
                keep.write(x)
                keep.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak_anon, peak_gpu, stopped = 0, None, ""
    while p.poll() is None:
        anon = sum(_anon_kib(q) for q in _tree(p.pid))
        peak_anon = max(peak_anon, anon)
        g = _gpu_used()
        if g is not None and gpu0 is not None:
            peak_gpu = max(peak_gpu or 0.0, g - gpu0)
        if stop_above_gib and anon > stop_above_gib * 2**20:
            stopped = f"stopped: anonymous memory passed {stop_above_gib:g} GiB"
            os.killpg(p.pid, 9)
        time.sleep(every)
    reader.join(timeout=5)
    if keep:
        keep.close()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Cost(p.returncode, wall, cpu, peak_anon / 1024, after.ru_maxrss / 1024, peak_gpu,
                "".join(tail), stopped)
