"""Read a built bundle back: its manifest, the exact stored codes and scales of a variant's
weights, and the architecture facts its graphs compute with. The exporters (export_gguf,
export_compressed) write other engines' formats from this, never from the source model: a
bundle is self-contained, and the exported numbers are the bundle's own.

`variant_weights` is the one place that says which stored tensor (and at which precision)
each weight of a variant is; every exporter walks its list. Tensors are read one at a time
with plain reads (not memory maps), so exporting a 7B bundle holds one tensor in memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.integrity import safetensors_index
from lsaq_runtime.format import (FLOAT_ROLE, LINEAR_PART, STORED_LINEARS, TABLE_BASE, layer_key, linear_base,
                                 quant_keys, split_precision, table_base)
from lsaq_runtime.manifest import load_manifest
from lsaq_runtime.verify import verify_bundle

from .errors import LsaqError
from .model_source import FAMILIES, Family

EMBED = TABLE_BASE["embed_tokens"]
LM_HEAD = TABLE_BASE["lm_head"]


def role_key(base: str, role: str) -> str:
    """Store key of one role (qweight, scales, zero_points) of a quantized weight at `base`."""
    return quant_keys(base)[role]
_NP = {"F16": np.float16, "F32": np.float32, "U8": np.uint8}


@dataclass
class Scheme:
    """How one stored quantized weight is laid out (MatMulNBits: quantize.py)."""

    bits: int
    block: int                 # MatMulNBits block: one scale (and zero point) per block
    symmetric: bool            # no stored zero points: 2^(bits-1) implied
    strategy: str              # "channel" (one scale a row, repeated per block) | "group"

    @property
    def group_size(self) -> int | None:
        return None if self.strategy == "channel" else self.block


@dataclass
class StoredWeight:
    """One weight of a variant as the store holds it.

    name: its Hugging Face module weight name, fused as stored for the decoder linears
    ("model.layers.3.self_attn.qkv_proj.weight"); base: the store key without the role
    ("model.layers.3.self_attn.qkv_proj.int4"); precision: fp16 | fp32 | int8 | int4."""

    name: str
    base: str
    precision: str
    shape: tuple[int, int]     # [out N, in K]
    role: str = "linear"       # linear | embedding | lm_head


@dataclass
class Quantized:
    """A stored quantized weight: unsigned codes, per-block scales and zero points."""

    scheme: Scheme
    n: int
    k: int
    codes: np.ndarray          # uint8 [N, n_blocks * block] (padding included)
    scales: np.ndarray         # float16 [N, n_blocks]
    zero_points: np.ndarray    # uint8 [N, n_blocks] (implied 2^(bits-1) when symmetric)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K]: exactly what the bundle's kernels compute with."""
        nb = self.scales.shape[1]
        c = self.codes.reshape(self.n, nb, -1).astype(np.float32)
        w = (c - self.zero_points[..., None].astype(np.float32)) * \
            self.scales.astype(np.float32)[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


@dataclass
class ArchFacts:
    """What a variant's graph computes beyond the manifest's shapes (read from the graph)."""

    family: Family
    architecture: str
    eps: float
    activation: str                       # silu | gelu_tanh
    attention_scale: float
    windows: list[int | None]             # sliding window per layer (None: full attention)
    local_rope: list[bool]                # layer uses the local RoPE table (Gemma 3)
    rope_attention_factor: float = 1.0
    rope_length_dependent: bool = False   # dynamic NTK or longrope switch in the graph
    embed_scale: float | None = None
    softcap: float | None = None
    qkv_bias: bool = False
    inv_freq: np.ndarray | None = None
    inv_freq_local: np.ndarray | None = None
    inv_freq_long: np.ndarray | None = None
    rope_switch: int | None = None
    rope: object = None                   # an exporter's own reading of the RoPE (export_gguf)


@dataclass
class BundleReader:
    root: Path
    manifest: dict
    index: dict[str, tuple[str, str, list[int], int, int]] = field(default_factory=dict)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(cls, bundle, verify: bool = True, progress=None) -> "BundleReader":
        """The bundle, checked by the runtime's own verification first (every file's sha256,
        every graph against the manifest and store): a damaged bundle is refused."""
        root = Path(bundle)
        try:
            if verify:
                problems = verify_bundle(root, progress)
                if problems:
                    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                    raise LsaqError(f"{root}: the bundle fails verification: {problems[0]}{more}; "
                                    "rebuild it or copy it again")
            m = load_manifest(root)
        except LsaqRuntimeError as e:
            raise LsaqError(str(e)) from None
        r = cls(root, m)
        for f in sorted({e["path"] for e in m["files"] if e["path"].endswith(".safetensors")}):
            try:
                for name, (dtype, shape, off, length) in safetensors_index(root / f).items():
                    r.index[name] = (f, dtype, shape, off, length)
            except LsaqRuntimeError as e:
                raise LsaqError(str(e)) from None
        return r

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def variant(self, name: str) -> dict:
        names = [v["name"] for v in self.manifest["variants"]]
        if name not in names:
            raise LsaqError(f"no variant {name!r} in {self.root}; the bundle has {', '.join(names)}")
        return next(v for v in self.manifest["variants"] if v["name"] == name)

    # ------------------------------------------------------------------ tensors
    def has(self, key: str) -> bool:
        return key in self.index

    def array(self, key: str) -> np.ndarray:
        """One stored tensor, read into memory (a private copy, not a memory map)."""
        if key not in self.index:
            raise LsaqError(f"{self.root}: the weight store lacks {key}")
        f, dtype, shape, off, length = self.index[key]
        if dtype not in _NP:
            raise LsaqError(f"{self.root}/{f}: {key} has dtype {dtype}, which a bundle never stores")
        dt = np.dtype(_NP[dtype]).newbyteorder("<")
        count = length // dt.itemsize
        with open(self.root / f, "rb") as fh:
            a = np.fromfile(fh, dtype=dt, count=count, offset=off)
        if a.size != math.prod(shape):
            raise LsaqError(f"{self.root}/{f}: {key} is truncated")
        return a.reshape(shape).astype(dt.newbyteorder("="), copy=False)

    def float_weight(self, w: StoredWeight) -> np.ndarray:
        """An fp16/fp32 weight as stored, in Hugging Face layout [N, K] (the store keeps the
        decoder's float linears pre-transposed, [K, N])."""
        if w.role == "linear":
            return np.ascontiguousarray(self.array(f"{w.base}.{FLOAT_ROLE}").T)
        return self.array(f"{w.base}.weight")

    def quantized(self, w: StoredWeight) -> Quantized:
        """A stored INT8/INT4 weight with its scheme read from the stored shapes and the
        manifest (channel: one scale a row, repeated in every block)."""
        bits = int(w.precision[3:])
        packed = self.array(role_key(w.base, "qweight"))
        scales = self.array(role_key(w.base, "scales"))
        n, nb, blob = packed.shape
        block = blob * 8 // bits
        k = w.shape[1]
        if n != w.shape[0] or not 0 <= nb * block - k < block or scales.shape != (n, nb):
            raise LsaqError(f"{self.root}: {w.base} is stored with shape {packed.shape}, not that "
                            f"of a {list(w.shape)} weight")
        if bits == 8:
            codes = packed.reshape(n, -1)
        else:
            codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
        if self.has(role_key(w.base, "zero_points")):
            zp = self.array(role_key(w.base, "zero_points"))
            if bits == 4:
                zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)
            zp = np.ascontiguousarray(zp[:, :nb])
            symmetric = False
        else:
            zp = np.full((n, nb), 1 << (bits - 1), np.uint8)
            symmetric = True
        strategy = self.strategy(bits, scales)
        return Quantized(Scheme(bits, block, symmetric, strategy), n, k, codes, scales, zp)

    def layout(self, w: StoredWeight) -> Scheme:
        """A stored quantized weight's scheme from the store's index alone (nothing read but
        the scales, and those only when a block is under 32, to tell a repeated row scale
        apart): planning an export of a 7B bundle reads no weights."""
        bits = int(w.precision[3:])
        key = role_key(w.base, "qweight")
        if key not in self.index:
            raise LsaqError(f"{self.root}: the weight store lacks {key}")
        n, nb, blob = self.index[key][2]
        block = blob * 8 // bits
        symmetric = not self.has(role_key(w.base, "zero_points"))
        q = self.manifest.get("quantization") or {}
        kind = "channel" if bits == 8 or q.get("scheme", "channel") == "channel" else "group"
        if kind == "channel" and block < 32:
            kind = self.strategy(bits, self.array(role_key(w.base, "scales")))
        return Scheme(bits, block, symmetric, kind)

    def strategy(self, bits: int, scales: np.ndarray) -> str:
        """channel | group: from the manifest's scheme (INT8 is always per channel), checked
        against the stored scales (a per-channel weight repeats its row's scale)."""
        q = self.manifest.get("quantization") or {}
        kind = "channel" if bits == 8 or q.get("scheme", "channel") == "channel" else "group"
        if kind == "channel" and not (scales == scales[:, :1]).all():
            kind = "group"   # never written so, but the stored numbers decide
        return kind

    # ------------------------------------------------------------------ the plan
    def variant_weights(self, variant: dict, head: str = "fp16") -> list[StoredWeight]:
        """Every matrix weight of `variant` with the stored tensor that holds it: the decoder
        linears at their precisions from `precisions`, the embedding table and the LM head.

        The token tables' precisions are the variant's `tables` (schema 6; fp16 when absent).
        A quantized table is stored like a linear (`model.embed_tokens.int8.qweight`, ...).
        head: what the LM head computes with when its table is fp16 (fp16: the float table;
        int8: the CPU graphs' INT8 copy, which is the int8 table itself since schema 6 and
        `lm_head.int8.*` before). A tied model whose head reads its embedding table at the
        table's precision gets no separate lm_head entry (the head is the embedding)."""
        mo = self.model
        h, dims = mo["hidden_size"], linear_dims(mo)
        out = []
        for i, p in enumerate(variant["precisions"]):
            try:
                parts = split_precision(p)
            except ValueError as e:
                raise LsaqError(str(e)) from None
            for lin in STORED_LINEARS:
                prec = parts[LINEAR_PART[lin]]
                out.append(StoredWeight(layer_key(i, f"{lin}.weight"),
                                        linear_base(i, lin, prec), prec, dims[lin]))
        vocab = mo["vocab_size"]
        emb_p, head_p = table_precisions(variant, head)
        out.append(self._table(EMBED, emb_p, (vocab, h), "embedding"))
        tied = self.tied
        if tied and head_p == emb_p:
            pass  # the head is the embedding table itself, at its precision
        elif tied and head_p == "fp16":
            out.append(self._table(LM_HEAD, head_p, (vocab, h), "lm_head", EMBED))
        elif tied and self.has(role_key(table_base("embed_tokens", head_p), "qweight")):
            # schema 6: the tied head's quantized copy is the embedding table's own codes
            out.append(self._table(LM_HEAD, head_p, (vocab, h), "lm_head", EMBED))
        else:   # untied, or an older bundle's CPU head copy lm_head.int8.*
            out.append(self._table(LM_HEAD, head_p, (vocab, h), "lm_head"))
        missing = [w.base for w in out if not self._stored(w)]
        if missing:
            raise LsaqError(f"{self.root}: the weight store lacks {missing[0]}"
                            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                            + f" for variant {variant['name']}; the bundle is incomplete")
        return out

    @property
    def tied(self) -> bool:
        """The LM head is the embedding table (no float lm_head.weight stored)."""
        return bool(self.model["tie_word_embeddings"]) or not self.has(f"{LM_HEAD}.weight")

    def _table(self, name: str, precision: str, shape, role: str, src: str | None = None
               ) -> StoredWeight:
        src = src or name
        base = src if precision in ("fp16", "fp32") else f"{src}.{precision}"
        return StoredWeight(f"{name}.weight", base, precision, tuple(shape), role)

    def _stored(self, w: StoredWeight) -> bool:
        if w.precision in ("fp16", "fp32"):
            return self.has(f"{w.base}.{FLOAT_ROLE}" if w.role == "linear" else f"{w.base}.weight")
        return self.has(role_key(w.base, "qweight"))

    # ------------------------------------------------------------------ the graph
    def arch_facts(self, variant: dict) -> ArchFacts:
        """The model facts a variant's graph holds (norm epsilon, activation, attention scale
        and windows, RoPE, Gemma's embedding scale and soft-cap)."""
        import onnx
        from onnx import numpy_helper

        arch = self.model["architecture"]
        if arch not in FAMILIES:
            raise LsaqError(f"{self.root}: architecture {arch!r} is not one this compiler knows")
        providers = variant["providers"]
        prov = providers.get("cpu") or next(iter(providers.values()))
        try:
            g = onnx.load_model_from_string((self.root / prov["graph"]).read_bytes()).graph
        except Exception as e:  # onnx raises its own decode errors
            raise LsaqError(f"{self.root / prov['graph']}: not a readable ONNX graph ({e})") from None
        L = self.model["num_layers"]
        consts, eps, act = {}, None, "silu"
        windows: list[int | None] = [None] * L
        local = [False] * L
        scale = None
        for n in g.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            if n.op_type == "Constant" and "value" in attrs:
                consts[n.output[0].rsplit("/", 1)[0]] = numpy_helper.to_array(attrs["value"])
            elif n.op_type == "SkipSimplifiedLayerNormalization" and eps is None:
                eps = float(attrs["epsilon"])
            elif n.op_type == "Gelu":
                act = "gelu_tanh"
            elif n.op_type == "GroupQueryAttention":
                layer = int(n.output[1].split(".")[1])        # present.{i}.key
                windows[layer] = int(attrs["local_window_size"]) if \
                    attrs.get("local_window_size", -1) > 0 else None
                local[layer] = n.input[7].startswith("rope_local/")
                scale = float(attrs.get("scale", 0.0)) or 1.0 / math.sqrt(self.model["head_dim"])
        if eps is None or scale is None:
            raise LsaqError(f"{self.root / prov['graph']}: no decoder layers found in the graph")

        def const(name):
            v = consts.get(name)
            return None if v is None else float(np.asarray(v).reshape(-1)[0])

        f = FAMILIES[arch]
        facts = ArchFacts(
            family=f, architecture=arch, eps=eps, activation=act, attention_scale=scale,
            windows=windows, local_rope=local,
            rope_attention_factor=const("rope/attention_factor") or 1.0,
            rope_length_dependent=("rope/factor" in consts or "rope/original_len" in consts),
            embed_scale=const("embed_scale"), softcap=const("softcap"),
            qkv_bias=self.has("model.layers.0.self_attn.qkv_proj.bias"),
            inv_freq=self.array("rope.inv_freq").astype(np.float32) if self.has("rope.inv_freq") else None,
            inv_freq_local=self.array("rope.local.inv_freq") if self.has("rope.local.inv_freq") else None,
            inv_freq_long=self.array("rope.inv_freq_long") if self.has("rope.inv_freq_long") else None,
            rope_switch=const("rope/original_len") and int(const("rope/original_len")),
        )
        if facts.inv_freq is None:
            raise LsaqError(f"{self.root}: the weight store lacks rope.inv_freq")
        return facts

    # ------------------------------------------------------------------ tokenizer
    def tokenizer_json(self) -> dict:
        p = self.root / self.manifest["tokenizer"]["dir"] / "tokenizer.json"
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise LsaqError(f"{p}: cannot be read as JSON ({e})") from None

    def tokenizer_dir(self) -> Path:
        return self.root / self.manifest["tokenizer"]["dir"]


def linear_dims(model: dict) -> dict[str, tuple[int, int]]:
    """[N, K] of each stored (fused) decoder linear, from the manifest's model facts."""
    h, i_size = model["hidden_size"], model["intermediate_size"]
    q_dim = model["num_attention_heads"] * model["head_dim"]
    kv_dim = model["num_key_value_heads"] * model["head_dim"]
    return {"self_attn.qkv_proj": (q_dim + 2 * kv_dim, h), "self_attn.o_proj": (h, q_dim),
            "mlp.gate_up_proj": (2 * i_size, h), "mlp.down_proj": (h, i_size)}


def table_precisions(variant: dict, head: str = "fp16") -> tuple[str, str]:
    """(embedding table, LM head) precisions of a variant: its `tables` (schema 6; fp16 when
    absent), with `head` for an LM head whose table is fp16 (the CPU graphs' INT8 copy)."""
    tables = variant.get("tables") or {}
    emb = tables.get("embed_tokens") or "fp16"
    lm = tables.get("lm_head") or "fp16"
    for what, p in (("embed_tokens", emb), ("lm_head", lm), ("head", head)):
        if p not in ("fp16", "int8", "int4"):
            raise LsaqError(f"variant {variant['name']}: {what} precision {p!r} is not fp16, "
                            "int8 or int4")
    return emb, (head if lm == "fp16" else lm)

