"""Compiled bundles for tests: small profiles, tiny bundles to export with an independent
reading of their weights (the exporters' tests), the inputs of a graph on an empty KV cache,
and edits of a built bundle as an attacker who changes both a file and the manifest would.

The expected weights are read with the safetensors package and dequantized by
quantize.QuantizedTensor (the compiler's own definition of what the kernels compute), not by
the exporters' bundle_reader, so a mistake in the reader cannot hide in both sides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from lsaq_compile.quantize import QuantizedTensor, QuantScheme

from .data import C4
from .models import make_tiny_family


def small_profile(**scoring):
    from lsaq_compile.profiles import Profile

    p = Profile(name="test")
    p.scoring.calibration = str(C4) if C4.is_file() else ""
    # the fixtures built from this profile were checked on the exact measurement; the streamed
    # estimate (the default profile's) is built and checked in test_measure.py/test_estimate.py
    p.scoring.measure = "exact"
    for k, v in scoring.items():
        setattr(p.scoring, k, v)
    return p

def exact_paper_profile(samples: int, seq_len: int, ladder: str):
    """The paper's quantizer (per-channel symmetric round to nearest) and Jaccard order, ranked
    by precision, on the exact kernel path (float activations, float LM head): what the parity
    tests compare with transformers."""
    prof = small_profile(samples=samples, seq_len=seq_len, metric="jaccard")
    prof.quantization.cpu_accuracy_level, prof.quantization.cpu_lm_head = 0, "fp16"
    prof.build.ladder, prof.build.quality_samples = ladder, 0
    q = prof.quantization
    q.scheme, q.symmetric, q.clip = "channel", True, "none"
    return prof

def empty_cache_feed(manifest: dict, ids: list[int], keep: int = 0) -> dict:
    """Inputs of a bundle graph for one sequence on an empty KV cache (a plain session, no
    IOBinding): the reference the runtime's cached runs are compared with. keep 0: all logits."""
    mo = manifest["model"]
    empty = np.zeros((1, mo["num_key_value_heads"], 0, mo["head_dim"]), np.float32)
    feed = {"input_ids": np.asarray([ids], np.int64),
            "seqlens_k": np.array([len(ids) - 1], np.int32),
            "total_sequence_length": np.array(len(ids), np.int32),
            "num_logits_to_keep": np.array(keep, np.int64)}
    for i in range(mo["num_layers"]):
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
    return feed

def build(hf: Path, out: Path, scheme: str = "channel", group_asym: bool = False) -> Path:
    """A tiny bundle on the exact kernels, the paper ladder (FP16, INT8, three mixes, INT4).
    group_asym: INT4 group-32 with zero points and the clipping search (the default profile's
    INT4 scheme), else per-channel symmetric (the paper's)."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    prof = exact_paper_profile(samples=4, seq_len=32, ladder="paper")
    if group_asym:
        q = prof.quantization
        q.scheme, q.group_size, q.symmetric, q.clip = "group", 32, False, "mse"
    return build_bundle(hf, out, profile=prof, progress=Progress(quiet=True))

def ladder_build(hf: Path, out: Path, scheme: str = "group", cpu_lm_head: str = "fp16") -> Path:
    """A tiny bundle of the default profile's ladder by bytes, with the token tables on the
    ladder (schema 6: INT8/INT4 embedding and LM head on most rungs, plus the t16 rung of INT8
    linears and fp16 tables), on the exact kernels. scheme: "group" for the default profile's
    INT4 (group 32, zero points), "channel" for per-channel symmetric. cpu_lm_head "int8": the
    CPU graphs of an fp16-table variant read the INT8 table as their head."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    prof = small_profile(samples=3, seq_len=48)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 3, 1, 2
    q = prof.quantization
    q.cpu_accuracy_level, q.cpu_lm_head, q.clip = 0, cpu_lm_head, "none"
    if scheme == "channel":
        q.scheme, q.symmetric, q.group_size = "channel", True, None
    assert q.tables == "ladder" and prof.build.ladder == "bytes"
    return build_bundle(hf, out, profile=prof, progress=Progress(quiet=True))

def family_bundle(tmp: Path, family: str, group_asym: bool = True, **overrides) -> Path:
    hf = make_tiny_family(tmp / f"hf-{family}", family, **overrides)
    return build(hf, tmp / f"bundle-{family}", group_asym=group_asym)

class Expected:
    """A bundle's weights as its kernels compute them, by Hugging Face name."""

    def __init__(self, bundle: Path):
        from safetensors.numpy import load_file

        self.m = json.loads((bundle / "manifest.json").read_text())
        self.store = {}
        for f in (bundle / "weights").glob("*.safetensors"):
            self.store.update(load_file(str(f)))
        mo = self.m["model"]
        self.q_dim = mo["num_attention_heads"] * mo["head_dim"]
        self.kv_dim = mo["num_key_value_heads"] * mo["head_dim"]

    def variant(self, name: str) -> dict:
        return next(v for v in self.m["variants"] if v["name"] == name)

    def stored(self, base: str, n: int, k: int, precision: str) -> np.ndarray:
        """float32 [n, k] of the weight stored under base (…{precision})."""
        if precision in ("fp16", "fp32"):
            key = f"{base}.weight_kn" if f"{base}.weight_kn" in self.store else f"{base}.weight"
            a = self.store[key].astype(np.float32)
            return np.ascontiguousarray(a.T) if key.endswith("weight_kn") else a
        bits = int(precision[3:])
        packed = self.store[f"{base}.qweight"]
        zp = self.store.get(f"{base}.zero_points")
        block = packed.shape[2] * 8 // bits
        scheme = QuantScheme(bits, "group", block, zp is None)
        return QuantizedTensor(scheme, n, k, block, packed, self.store[f"{base}.scales"],
                               zp).dequantize()

    def tables(self, variant: str) -> dict[str, str]:
        return self.variant(variant).get("tables") or {"embed_tokens": "fp16", "lm_head": "fp16"}

    def embedding(self, variant: str) -> np.ndarray:
        """float32 [vocab, hidden]: the embedding table the variant's graphs gather from."""
        mo = self.m["model"]
        p = self.tables(variant)["embed_tokens"]
        base = "model.embed_tokens" if p == "fp16" else f"model.embed_tokens.{p}"
        return self.stored(base, mo["vocab_size"], mo["hidden_size"], p)

    def head(self, variant: str, cpu: bool = True) -> tuple[np.ndarray | None, str]:
        """(float32 [vocab, hidden] LM head the variant's CPU graph computes with (cpu=False: its
        GPU graph, never the CPU's INT8 copy), or None when it is the embedding table at the
        table's precision; its precision)."""
        mo = self.m["model"]
        n, k = mo["vocab_size"], mo["hidden_size"]
        t = self.tables(variant)
        p = t["lm_head"]
        if p == "fp16" and cpu:
            p = self.variant(variant)["providers"].get("cpu", {}).get("lm_head", "fp16")
        tied = "lm_head.weight" not in self.store
        if tied and p == t["embed_tokens"]:
            return None, p
        if p == "fp16":
            return self.stored("lm_head" if not tied else "model.embed_tokens", n, k, p), p
        base = f"model.embed_tokens.{p}" if tied and f"model.embed_tokens.{p}.qweight" in \
            self.store else f"lm_head.{p}"
        return self.stored(base, n, k, p), p

    def linear(self, variant: str, layer: int, lin: str) -> tuple[np.ndarray, str]:
        """(float32 weight [N, K] of stored (fused) linear lin, its precision)."""
        from lsaq_runtime.format import LINEAR_PART, split_precision

        mo = self.m["model"]
        p = split_precision(self.variant(variant)["precisions"][layer])[LINEAR_PART[lin]]
        h, ff = mo["hidden_size"], mo["intermediate_size"]
        n, k = {"self_attn.qkv_proj": (self.q_dim + 2 * self.kv_dim, h),
                "self_attn.o_proj": (h, self.q_dim), "mlp.gate_up_proj": (2 * ff, h),
                "mlp.down_proj": (h, ff)}[lin]
        return self.stored(f"model.layers.{layer}.{lin}.{p}", n, k, p), p

# ------------------------------------------------------------------------------- helpers
def manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())

def save(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))

def rehash(b: Path, rel: str) -> None:
    """Make the manifest agree with a changed file, as an attacker who edits both would."""
    m = manifest(b)
    data = (b / rel).read_bytes()
    for f in m["files"]:
        if f["path"] == rel:
            f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    save(b, m)

def backtracking_tokenizer(bundle: Path) -> None:
    """The bundle's tokenizer with a Split pre-tokenizer whose regex backtracks until
    Oniguruma gives up on a run of 'a's not followed by the end: the library then panics."""
    p = bundle / "tokenizer" / "tokenizer.json"
    t = json.loads(p.read_text())
    t["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False},
        t["pre_tokenizer"]]}
    p.write_text(json.dumps(t))
    rehash(bundle, "tokenizer/tokenizer.json")
