"""Shared by test_export_gguf.py and test_export_compressed.py: tiny bundles to export and an
independent reading of a bundle's weights to compare exports with.

The expected weights are read with the safetensors package and dequantized by
quantize.QuantizedTensor (the compiler's own definition of what the kernels compute), not by
the exporters' bundle_reader, so a mistake in the reader cannot hide in both sides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import _exact_paper_profile, make_tiny_family
from lsaq_compile.quantize import QuantizedTensor, QuantScheme


def build(hf: Path, out: Path, scheme: str = "channel", group_asym: bool = False) -> Path:
    """A tiny bundle on the exact kernels, the paper ladder (FP16, INT8, three mixes, INT4).
    group_asym: INT4 group-32 with zero points and the clipping search (the default profile's
    INT4 scheme), else per-channel symmetric (the paper's)."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    prof = _exact_paper_profile(samples=4, seq_len=32, ladder="paper")
    if group_asym:
        q = prof.quantization
        q.scheme, q.group_size, q.symmetric, q.clip = "group", 32, False, "mse"
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

    def linear(self, variant: str, layer: int, lin: str) -> tuple[np.ndarray, str]:
        """(float32 weight [N, K] of stored (fused) linear lin, its precision)."""
        from lsaq_runtime.manifest import LINEAR_PART, split_precision

        mo = self.m["model"]
        p = split_precision(self.variant(variant)["precisions"][layer])[LINEAR_PART[lin]]
        h, ff = mo["hidden_size"], mo["intermediate_size"]
        n, k = {"self_attn.qkv_proj": (self.q_dim + 2 * self.kv_dim, h),
                "self_attn.o_proj": (h, self.q_dim), "mlp.gate_up_proj": (2 * ff, h),
                "mlp.down_proj": (h, ff)}[lin]
        return self.stored(f"model.layers.{layer}.{lin}.{p}", n, k, p), p
