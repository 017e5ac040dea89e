"""Export one variant of a bundle as a GGUF file for llama.cpp (and Ollama, LM Studio).

Every weight is written from the bundle's own codes and scales, never re-quantized from floats,
so llama.cpp computes with the bundle's numbers. `gguf_type` is the one mapping from a stored
weight's precision and scheme to the GGUF type:

  per-channel symmetric INT8   -> Q8_0  (the row's scale in every 32-block: exact)
  symmetric INT4 (channel or group, block a multiple of 32) -> Q4_0 (exact)
  asymmetric group INT4, integer zero point -> Q4_1: d = scale, m = -scale x zero point; m is
      rounded to float16, so this one is not exact: its relative RMS error is measured per
      tensor and reported
  fp16 -> F16, fp32 -> F32; norms, biases and RoPE factors F32
A quantized weight GGUF cannot hold exactly in its type (a row length that is not a multiple of
32) is written as F16 of its dequantized values, and reported with its error.

Decoder linears are stored fused (q|k|v, gate|up); they are split by rows into llama.cpp's
tensors (exact: quantization is per row), except Phi-3, whose GGUF keeps them fused. Llama and
Mistral q/k rows are permuted into llama.cpp's rotary layout, as its converter does.
Tensors are streamed: the header is written from shapes alone, then one tensor at a time.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from lsaq_runtime.format import EMBED, LM_HEAD, layer_prefix

from .bundle_reader import BundleReader, Quantized, Scheme, StoredWeight
from .errors import LsaqError
from .export_common import (GGUF_MARKER_KEY, MODELFILE_HEAD, check_parent, check_target,
                            clean_stale, export_record, gguf_refusal, modelfile_refusal,
                            put_in_place, tmp_path)

QK = 32   # elements per block of Q8_0, Q4_0 and Q4_1

# model_source family (transformers architecture) -> llama.cpp's general.architecture
GGUF_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
             "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3",
             "Gemma3ForCausalLM": "gemma3"}
# llama.cpp's rope_freqs / rope_factors tensors: which architectures read per-frequency factors
ROPE_FACTOR_TENSORS = {"llama": ("rope_freqs.weight",),
                       "phi3": ("rope_factors_short.weight", "rope_factors_long.weight")}
# architectures whose llama.cpp graph applies sliding windows (Gemma 3 only, of these)
SWA_ARCHS = {"gemma3"}


# ------------------------------------------------------------------------------ type mapping
@dataclass
class Written:
    """One tensor of the export with how exactly it holds the bundle's numbers."""

    name: str
    type: str
    source: str
    exact: bool
    rel_rms: float = 0.0
    note: str = ""


def gguf_type(w: StoredWeight, scheme: Scheme | None, scales=None, zero_points=None):
    """(GGML type, exact) of stored weight `w` with quantization `scheme` (None for a float
    weight): the single place that maps a bundle precision and scheme to a GGUF type. scales and
    zero points are needed only for a block under 32 (are its halves one GGUF block?)."""
    from gguf import GGMLQuantizationType as T

    if w.precision == "fp16":
        return T.F16, True
    if w.precision == "fp32":
        return T.F32, True
    if scheme is None:
        raise LsaqError(f"{w.base}: quantized weight without its scheme")
    k = w.shape[1]
    b = scheme.block
    if k % QK or not (b % QK == 0 or (QK % b == 0 and scales is not None and _halves_agree(
            scales, zero_points, QK // b))):
        return T.F16, False                     # nearest: dequantized values in F16
    if scheme.bits == 8:
        return (T.Q8_0, True) if scheme.symmetric else (T.F16, False)
    if scheme.bits == 4:
        return (T.Q4_0, True) if scheme.symmetric else (T.Q4_1, False)
    return T.F16, False


def _halves_agree(s: np.ndarray, z: np.ndarray | None, r: int) -> bool:
    """Do the r blocks inside each 32-block share one scale (and zero point)?"""
    if s.shape[1] % r:
        return False
    s3 = s.reshape(s.shape[0], -1, r)
    ok = bool((s3 == s3[..., :1]).all())
    if ok and z is not None:
        z3 = z.reshape(z.shape[0], -1, r)
        ok = bool((z3 == z3[..., :1]).all())
    return ok


def _sub_blocks(q: Quantized) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, zero point) per 32-element block [N, K/32], or None when GGUF's 32-blocks
    cannot carry them exactly (K not a multiple of 32, or a 16-block whose halves differ)."""
    if q.k % QK:
        return None
    b = q.scheme.block
    s, z = q.scales, q.zero_points
    if b % QK == 0:
        s, z = np.repeat(s, b // QK, axis=1), np.repeat(z, b // QK, axis=1)
    elif QK % b == 0:
        r = QK // b
        s3, z3 = s.reshape(q.n, -1, r), z.reshape(q.n, -1, r)
        if not ((s3 == s3[..., :1]).all() and (z3 == z3[..., :1]).all()):
            return None
        s, z = s3[..., 0], z3[..., 0]
    else:
        return None
    nb = q.k // QK
    return np.ascontiguousarray(s[:, :nb]), np.ascontiguousarray(z[:, :nb])


# ------------------------------------------------------------------------------ block packing
def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[N, K] 4-bit codes -> GGUF's Q4 byte layout per 32-block: byte j holds element j in its
    low nibble and element j + 16 in its high nibble."""
    n = codes.shape[0]
    c = codes.reshape(n, -1, QK)
    return (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)


def _blocks(n: int, parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-block fields ([N, nb, bytes] uint8 each) into GGUF rows [N, nb * size]."""
    return np.concatenate(parts, axis=-1).reshape(n, -1)


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    return np.ascontiguousarray(a.astype("<f2")).view(np.uint8).reshape(n, -1, 2)


def _row_errors(q: Quantized, approx_rows: Callable[[slice], np.ndarray]
                ) -> tuple[np.ndarray, np.ndarray]:
    """(squared error, squared norm) per row of the written weight against the bundle's
    dequantized one, a few rows at a time (a 7B tensor never sits in float32 twice)."""
    err2, ref2 = np.zeros(q.n), np.zeros(q.n)
    step = max(1, (1 << 22) // max(q.k, 1))
    for a in range(0, q.n, step):
        rows = slice(a, min(q.n, a + step))
        part = Quantized(q.scheme, rows.stop - a, q.k, q.codes[rows], q.scales[rows],
                         q.zero_points[rows])
        exact = part.dequantize().astype(np.float64)
        d = approx_rows(rows).astype(np.float64) - exact
        err2[rows] = (d * d).sum(axis=1)
        ref2[rows] = (exact * exact).sum(axis=1)
    return err2, ref2


def encode(q: Quantized, gtype) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(rows in GGUF's layout for type gtype [N, row bytes] or F16 [N, K], then per row the
    squared error against the bundle's dequantized weight and its squared norm; None, None
    when exact) of stored weight q."""
    from gguf import GGMLQuantizationType as T

    n, k = q.n, q.k
    if gtype == T.F16:
        w16 = np.empty((n, k), np.float16)
        step = max(1, (1 << 22) // max(k, 1))
        for a in range(0, n, step):
            rows = slice(a, min(n, a + step))
            part = Quantized(q.scheme, rows.stop - a, k, q.codes[rows], q.scales[rows],
                             q.zero_points[rows])
            w16[rows] = part.dequantize().astype(np.float16)
        return (w16, *_row_errors(q, lambda rows: w16[rows]))
    s, z = _sub_blocks(q)
    codes = np.ascontiguousarray(q.codes[:, :k])
    d = _f16_bytes(s)
    if gtype == T.Q8_0:
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8).reshape(n, -1, QK)
        return _blocks(n, [d, qs]), None, None
    if gtype == T.Q4_0:
        return _blocks(n, [d, _nibbles(codes)]), None, None
    if gtype == T.Q4_1:
        m = (-(s.astype(np.float32) * z.astype(np.float32))).astype(np.float16)

        def approx(rows):   # what llama.cpp computes, d * code + m
            c = codes[rows].reshape(rows.stop - rows.start, -1, QK).astype(np.float32)
            return (c * s[rows].astype(np.float32)[..., None]
                    + m[rows].astype(np.float32)[..., None]).reshape(-1, k)

        return (_blocks(n, [d, _f16_bytes(m), _nibbles(codes)]), *_row_errors(q, approx))
    raise LsaqError(f"GGUF type {gtype.name} is not written by this exporter")


def _nbytes(gtype, n: int, k: int) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[gtype]
    return n * (k // block) * size


# ------------------------------------------------------------------------------ architecture
@dataclass
class RopePlan:
    base: float
    linear_factor: float | None = None      # uniform factor: rope.scaling.type linear
    factors: np.ndarray | None = None       # per-frequency divisors (rope_freqs)
    local_base: float | None = None


def _rope_base(inv: np.ndarray, dim: int) -> float:
    """The base b of inv_freq[i] = b^(-2i/dim) (times factors equal on the two highest
    frequencies, as every supported scaling leaves them), rounded where the float32 error
    alone separates it from a round number."""
    est = float((inv[0] / inv[1]) ** (dim / 2))
    for digits in range(0, 7):
        r = round(est, -int(math.floor(math.log10(est))) + digits)
        if abs(r - est) <= 1e-4 * est:
            return float(r)
    return est


def _default_inv(base: float, dim: int) -> np.ndarray:
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.float32(base) ** exps).astype(np.float32)


def rope_plan(facts, dim: int, gguf_arch: str) -> RopePlan:
    if facts.rope_length_dependent:
        raise LsaqError("this bundle's RoPE changes with the sequence length (dynamic NTK or "
                        "longrope past the original length); llama.cpp chooses such factors by "
                        "the context size instead, so it cannot compute the bundle's numbers: "
                        "not exported")
    if abs(facts.rope_attention_factor - 1.0) > 1e-6:
        raise LsaqError(f"this bundle's RoPE multiplies cos/sin by "
                        f"{facts.rope_attention_factor:.6g} (YaRN / longrope attention factor), "
                        "which llama.cpp applies only with its own YaRN parameters: not exported")
    inv = facts.inv_freq.astype(np.float64)
    base = _rope_base(inv, dim)
    ratio = _default_inv(base, dim).astype(np.float64) / inv    # per-frequency divisor
    plan = RopePlan(base)
    if np.allclose(ratio, 1.0, rtol=2e-6, atol=0):
        pass
    elif np.allclose(ratio, ratio[0], rtol=2e-6, atol=0):
        plan.linear_factor = float(ratio[0])
    elif gguf_arch in ROPE_FACTOR_TENSORS:
        plan.factors = ratio.astype(np.float32)
    else:
        raise LsaqError(f"this bundle's RoPE divides each frequency by its own factor, which "
                        f"llama.cpp reads (rope_freqs) for llama and phi3 models but not for "
                        f"{gguf_arch}: not exported")
    if facts.inv_freq_local is not None:
        plan.local_base = _rope_base(facts.inv_freq_local.astype(np.float64), dim)
        if not np.allclose(_default_inv(plan.local_base, dim), facts.inv_freq_local, rtol=2e-6):
            raise LsaqError("the local (sliding-layer) RoPE of this bundle is scaled, which "
                            "llama.cpp's gemma3 does not read: not exported")
    return plan


def check_arch(reader: BundleReader, facts, gguf_arch: str) -> list[str]:
    """Refuse what llama.cpp's architecture cannot compute; return notes on what it computes
    differently in a way users must know (e.g. a sliding window it does not apply)."""
    mo, notes = reader.model, []
    L = mo["num_layers"]
    if facts.softcap and gguf_arch != "gemma3":
        raise LsaqError(f"final logit soft-capping is not read by llama.cpp's {gguf_arch}")
    if gguf_arch == "gemma3":
        # llama.cpp does not read an attention scale for gemma3: 1/sqrt(head_dim), or
        # 1/sqrt(hidden/heads) for the 62-layer model
        want = 1 / math.sqrt(mo["hidden_size"] / mo["num_attention_heads"]) if L == 62 else \
            1 / math.sqrt(mo["head_dim"])
        if not math.isclose(facts.attention_scale, want, rel_tol=1e-5):
            raise LsaqError(f"the bundle scales attention scores by {facts.attention_scale:.6g}, "
                            f"but llama.cpp's gemma3 always uses {want:.6g} for a {L}-layer "
                            "model: not exported")
        if facts.embed_scale is None:
            raise LsaqError("a Gemma 3 bundle without its embedding scale: rebuild it")
    elif not math.isclose(facts.attention_scale, 1 / math.sqrt(mo["head_dim"]), rel_tol=1e-5):
        raise LsaqError(f"the bundle scales attention scores by {facts.attention_scale:.6g}, not "
                        f"1/sqrt(head_dim); llama.cpp's {gguf_arch} cannot be told so: not exported")
    if facts.activation != ("gelu_tanh" if gguf_arch == "gemma3" else "silu"):
        raise LsaqError(f"the bundle's MLP activation ({facts.activation}) is not the one "
                        f"llama.cpp's {gguf_arch} computes: not exported")
    windows = {w for w in facts.windows if w}
    if windows and gguf_arch not in SWA_ARCHS:
        notes.append(f"note: the bundle attends within a sliding window of {max(windows)} "
                     f"tokens; llama.cpp's {gguf_arch} attends to the whole context, so outputs "
                     f"differ once a sequence is longer than {max(windows)} tokens")
    if len(windows) > 1:
        raise LsaqError(f"layers use different sliding windows {sorted(windows)}; GGUF holds one")
    return notes


# ------------------------------------------------------------------------------ tokenizer
# tokenizer.json pre-tokenizers llama.cpp names (llama-vocab.cpp), by their structure
_GPT2_RE = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"
_LLAMA3_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?"
              "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_RE = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?"
             "[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")


def _pre_signature(pre: dict | None) -> tuple:
    if pre is None:
        return ()
    items = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    sig = []
    for p in items:
        t = p.get("type")
        if t == "ByteLevel":
            sig.append(("ByteLevel", bool(p.get("use_regex", True))))
        elif t == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits"))))
        elif t == "Split":
            pat = p.get("pattern", {})
            sig.append(("Split", pat.get("Regex", pat.get("String")), p.get("behavior")))
        else:
            sig.append((t,))
    return tuple(sig)


_PRE_NAMES = {
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("Split", _LLAMA3_RE, "Isolated"), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_RE, "Isolated"), ("ByteLevel", False)): "qwen2",
}


def tokenizer_fields(reader: BundleReader, vocab_size: int) -> dict:
    """GGUF tokenizer metadata (key -> value) from the bundle's tokenizer.json."""
    from gguf import TokenType

    tj = reader.tokenizer_json()
    model = tj.get("model") or {}
    tok = reader.manifest["tokenizer"]
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise LsaqError(f"the bundle's tokenizer is a {model.get('type')} model; the GGUF export "
                        "writes byte-level BPE tokenizers (llama.cpp's gpt2 type) only")
    sig = _pre_signature(tj.get("pre_tokenizer"))
    pre = _PRE_NAMES.get(sig)
    if pre is None or model.get("byte_fallback"):
        raise LsaqError(f"the bundle's tokenizer pre-tokenizer {list(sig) or None} is not one "
                        "llama.cpp names (gpt-2, smollm, llama-bpe, qwen2): not exported")
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id = {int(i): t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    # one token per embedding row: ids past the vocabulary (a tokenizer's extra pad token)
    # have no row, so the model can never see them
    beyond = sorted(i for i in by_id if i >= vocab_size)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            a = added.get(i)
            types.append(TokenType.NORMAL if a is None else
                         TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    f = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
         "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [int(t) for t in types],
         "tokenizer.ggml.merges": merges,
         "tokenizer.ggml.add_bos_token": bool(tok.get("add_bos_token")),
         "tokenizer.ggml.add_eos_token": False}
    if tok.get("bos_token_id") is not None:
        f["tokenizer.ggml.bos_token_id"] = int(tok["bos_token_id"])
    eos = tok.get("eos_token_ids") or []
    if eos:
        f["tokenizer.ggml.eos_token_id"] = int(eos[0])
    if len(eos) > 1:
        f["tokenizer.ggml.eot_token_id"] = int(eos[1])
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"]:
        f["tokenizer.ggml.unknown_token_id"] = int(model["vocab"][unk])
    pad = _config_token_id(reader, "pad_token", model["vocab"], added)
    if pad is not None and pad < vocab_size:
        f["tokenizer.ggml.padding_token_id"] = pad
    if isinstance(tok.get("chat_template"), str):
        f["tokenizer.chat_template"] = tok["chat_template"]
    if beyond:
        f["_notes"] = [f"note: {len(beyond)} tokenizer token(s) with ids past the model's "
                       f"{vocab_size}-row vocabulary ({', '.join(repr(by_id[i]) for i in beyond[:3])}) "
                       "are left out of the GGUF: the model has no embedding for them"]
    return f


def _config_token_id(reader, key: str, vocab: dict, added: dict) -> int | None:
    try:
        cfg = json.loads((reader.tokenizer_dir() / "tokenizer_config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None
    t = cfg.get(key)
    t = t.get("content") if isinstance(t, dict) else t
    if not isinstance(t, str):
        return None
    ids = [i for i, a in added.items() if a["content"] == t]
    return ids[0] if ids else vocab.get(t)


# ------------------------------------------------------------------------------ tensor plan
@dataclass
class Planned:
    name: str                 # GGUF tensor name
    gtype: object             # GGMLQuantizationType
    shape: tuple[int, ...]    # numpy order: [N, K] for matrices
    nbytes: int
    produce: Callable[[], np.ndarray]   # bytes/floats in the type's layout, numpy order
    record: Written


def _qk_perm(n_head: int, rows: int) -> np.ndarray:
    """Row order llama.cpp's rotary layout wants for q or k (its converter's permute)."""
    hd = rows // n_head
    return np.arange(rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(-1)


class _Linear:
    """One stored (fused) weight, converted once and handed out by row ranges."""

    def __init__(self, reader: BundleReader, w: StoredWeight):
        self.reader, self.w = reader, w
        scheme, scales, zps = None, None, None
        if w.precision in ("int8", "int4"):
            scheme = reader.layout(w)
            if scheme.block < QK:   # only then do the scales decide the type
                q = reader.quantized(w)
                scales, zps = q.scales, q.zero_points
        self.gtype, self.exact = gguf_type(w, scheme, scales, zps)
        self._rows = None
        self._err2 = self._ref2 = None

    def rows(self) -> np.ndarray:
        if self._rows is None:
            if self.w.precision in ("fp16", "fp32"):
                a = self.reader.float_weight(self.w)
                self._rows = a.astype(np.float16 if self.w.precision == "fp16" else np.float32,
                                      copy=False)
            else:
                self._rows, self._err2, self._ref2 = encode(self.reader.quantized(self.w),
                                                            self.gtype)
        return self._rows

    def error(self, lo: int, hi: int) -> float:
        """Relative RMS error of rows lo:hi as written (0 when exact)."""
        if self._err2 is None:
            return 0.0
        ref = float(self._ref2[lo:hi].sum())
        return 0.0 if ref == 0 else math.sqrt(float(self._err2[lo:hi].sum()) / ref)

    def release(self) -> None:
        self._rows = self._err2 = self._ref2 = None


def plan_tensors(reader: BundleReader, variant: dict, facts, gguf_arch: str,
                 head: str) -> list[Planned]:
    mo = reader.model
    heads, kvh, hd = mo["num_attention_heads"], mo["num_key_value_heads"], mo["head_dim"]
    q_dim, kv_dim, ff = heads * hd, kvh * hd, mo["intermediate_size"]
    permute = facts.family.gguf_permuted_qk
    fused = gguf_arch == "phi3"
    out: list[Planned] = []

    def add_matrix(name: str, lin: _Linear, lo: int, hi: int, perm: np.ndarray | None,
                   last: bool) -> None:
        k = lin.w.shape[1]
        nbytes = _nbytes(lin.gtype, hi - lo, k)
        rec = Written(name, lin.gtype.name, lin.w.base, lin.exact)

        def produce():
            a = lin.rows()[lo:hi]
            if perm is not None:
                a = a[perm]
            rec.rel_rms = lin.error(lo, hi)
            if not lin.exact and lin.gtype.name == "F16":
                rec.note = "nearest type: a row length GGUF's 32-blocks cannot hold"
            if last:
                lin.release()
            return np.ascontiguousarray(a)

        out.append(Planned(name, lin.gtype, (hi - lo, k), nbytes, produce, rec))

    def add_vector(name: str, fetch: Callable[[], np.ndarray], n: int, src: str) -> None:
        from gguf import GGMLQuantizationType as T

        rec = Written(name, "F32", src, True)
        out.append(Planned(name, T.F32, (n,), 4 * n,
                           lambda: np.ascontiguousarray(fetch(), dtype=np.float32), rec))

    weights = reader.variant_weights(variant, head)
    by_name = {w.name: w for w in weights}
    emb = _Linear(reader, by_name[EMBED])
    add_matrix("token_embd.weight", emb, 0, mo["vocab_size"], None, True)
    h = mo["hidden_size"]
    add_vector("output_norm.weight", lambda: reader.array("model.norm.weight"), h,
               "model.norm.weight")
    if LM_HEAD in by_name:
        head_w = _Linear(reader, by_name[LM_HEAD])
        add_matrix("output.weight", head_w, 0, mo["vocab_size"], None, True)
    rp = facts.rope
    if rp.factors is not None:
        for tname in ROPE_FACTOR_TENSORS[gguf_arch]:
            add_vector(tname, lambda: rp.factors, len(rp.factors), "rope.inv_freq")

    gemma = gguf_arch == "gemma3"
    for i in range(mo["num_layers"]):
        p = layer_prefix(i)
        blk = f"blk.{i}"

        def norm(key):
            return lambda: reader.array(key)

        add_vector(f"{blk}.attn_norm.weight", norm(f"{p}.input_layernorm.weight"), h,
                   f"{p}.input_layernorm.weight")
        if gemma:
            add_vector(f"{blk}.post_attention_norm.weight",
                       norm(f"{p}.post_attention_layernorm.weight"), h,
                       f"{p}.post_attention_layernorm.weight")
            add_vector(f"{blk}.ffn_norm.weight", norm(f"{p}.pre_feedforward_layernorm.weight"),
                       h, f"{p}.pre_feedforward_layernorm.weight")
            add_vector(f"{blk}.post_ffw_norm.weight",
                       norm(f"{p}.post_feedforward_layernorm.weight"), h,
                       f"{p}.post_feedforward_layernorm.weight")
        else:
            add_vector(f"{blk}.ffn_norm.weight", norm(f"{p}.post_attention_layernorm.weight"),
                       h, f"{p}.post_attention_layernorm.weight")
        if facts.family.qk_norm:
            key = f"{p}.self_attn.qk_norm.weight"

            def qk_row(row, key=key):
                def f():
                    t = reader.array(key)
                    part = t[:heads] if row == 0 else t[heads:]
                    if not (part == part[:1]).all():
                        raise LsaqError(f"{key}: q/k norm rows differ across heads")
                    return part[0]
                return f
            add_vector(f"{blk}.attn_q_norm.weight", qk_row(0), hd, key)
            add_vector(f"{blk}.attn_k_norm.weight", qk_row(1), hd, key)
        if facts.qkv_bias:
            key = f"{p}.self_attn.qkv_proj.bias"
            spans = {"attn_q": (0, q_dim, heads), "attn_k": (q_dim, q_dim + kv_dim, kvh),
                     "attn_v": (q_dim + kv_dim, q_dim + 2 * kv_dim, None)}
            for t, (lo, hi, nh) in spans.items():
                def bias(lo=lo, hi=hi, nh=nh, key=key):
                    b = reader.array(key)[lo:hi]
                    return b[_qk_perm(nh, hi - lo)] if permute and nh else b
                add_vector(f"{blk}.{t}.bias", bias, hi - lo, key)

        qkv = _Linear(reader, by_name[f"{p}.self_attn.qkv_proj.weight"])
        if fused:
            add_matrix(f"{blk}.attn_qkv.weight", qkv, 0, q_dim + 2 * kv_dim, None, True)
        else:
            add_matrix(f"{blk}.attn_q.weight", qkv, 0, q_dim,
                       _qk_perm(heads, q_dim) if permute else None, False)
            add_matrix(f"{blk}.attn_k.weight", qkv, q_dim, q_dim + kv_dim,
                       _qk_perm(kvh, kv_dim) if permute else None, False)
            add_matrix(f"{blk}.attn_v.weight", qkv, q_dim + kv_dim, q_dim + 2 * kv_dim, None, True)
        o = _Linear(reader, by_name[f"{p}.self_attn.o_proj.weight"])
        add_matrix(f"{blk}.attn_output.weight", o, 0, h, None, True)
        gu = _Linear(reader, by_name[f"{p}.mlp.gate_up_proj.weight"])
        if fused:   # llama.cpp's phi3: gate|up in ffn_up, 2 x n_ff rows
            add_matrix(f"{blk}.ffn_up.weight", gu, 0, 2 * ff, None, True)
        else:
            add_matrix(f"{blk}.ffn_gate.weight", gu, 0, ff, None, False)
            add_matrix(f"{blk}.ffn_up.weight", gu, ff, 2 * ff, None, True)
        down = _Linear(reader, by_name[f"{p}.mlp.down_proj.weight"])
        add_matrix(f"{blk}.ffn_down.weight", down, 0, h, None, True)
    return out


# ------------------------------------------------------------------------------ metadata
def _file_type(planned: list[Planned]):
    """general.file_type: the type holding most of the matrix bytes (informational)."""
    from gguf import LlamaFileType as F

    by = {}
    for p in planned:
        if len(p.shape) == 2:
            by[p.gtype.name] = by.get(p.gtype.name, 0) + p.nbytes
    top = max(by, key=by.get)
    return {"F16": F.MOSTLY_F16, "F32": F.ALL_F32, "Q8_0": F.MOSTLY_Q8_0,
            "Q4_0": F.MOSTLY_Q4_0, "Q4_1": F.MOSTLY_Q4_1}[top]


def write_metadata(wr, reader: BundleReader, variant: dict, facts, gguf_arch: str,
                   planned: list[Planned], record: dict) -> list[str]:
    """Write the metadata; return notes on what the GGUF leaves out."""
    from gguf import GGUFValueType as V
    from gguf import RopeScalingType

    mo = reader.model
    wr.add_name(f"{mo['name']} ({variant['name']})")
    wr.add_type("model")
    wr.add_file_type(_file_type(planned))
    wr.add_quantization_version(2)
    wr.add_context_length(int(mo["max_position_embeddings"]))
    wr.add_embedding_length(mo["hidden_size"])
    wr.add_feed_forward_length(mo["intermediate_size"])
    wr.add_block_count(mo["num_layers"])
    wr.add_head_count(mo["num_attention_heads"])
    wr.add_head_count_kv(mo["num_key_value_heads"])
    wr.add_layer_norm_rms_eps(facts.eps)
    wr.add_vocab_size(mo["vocab_size"])
    hd = mo["head_dim"]
    wr.add_rope_dimension_count(hd)
    if hd * mo["num_attention_heads"] != mo["hidden_size"] or gguf_arch in ("gemma3", "qwen3"):
        wr.add_key_length(hd)
        wr.add_value_length(hd)
    rp = facts.rope
    wr.add_rope_freq_base(rp.base)
    if rp.linear_factor is not None:
        wr.add_rope_scaling_type(RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(rp.linear_factor)
    if gguf_arch == "phi3" and rp.factors is not None:
        # equal short and long factors: which one llama.cpp picks does not matter
        wr.add_rope_scaling_orig_ctx_len(int(mo["max_position_embeddings"]))
    if gguf_arch == "gemma3":
        windows = [w for w in facts.windows if w]
        if windows:
            wr.add_sliding_window(int(windows[0]))
            wr.add_sliding_window_pattern([bool(w) for w in facts.windows])
            if rp.local_base is not None:
                wr.add_rope_freq_base_swa(rp.local_base)
        if facts.softcap:
            wr.add_final_logit_softcapping(float(facts.softcap))
    fields = tokenizer_fields(reader, mo["vocab_size"])
    notes = fields.pop("_notes", [])
    for key, val in fields.items():
        if isinstance(val, bool):
            wr.add_bool(key, val)
        elif isinstance(val, int):
            wr.add_uint32(key, val)
        elif isinstance(val, str):
            wr.add_string(key, val)
        elif key == "tokenizer.ggml.token_type":
            wr.add_array(key, val)
        else:
            wr.add_key_value(key, val, V.ARRAY, sub_type=V.STRING)
    wr.add_string(GGUF_MARKER_KEY, json.dumps(record, sort_keys=True))
    return notes


# ------------------------------------------------------------------------------ export
@dataclass
class GGUFReport:
    path: Path
    modelfile: Path | None
    tensors: list[Written]
    notes: list[str]
    bytes: int
    seconds: float

    def lines(self) -> list[str]:
        types = {}
        for t in self.tensors:
            types[t.type] = types.get(t.type, 0) + 1
        out = [f"wrote {self.path} ({self.bytes / 2**20:,.1f} MiB, "
               + ", ".join(f"{n} {k}" for k, n in sorted(types.items())) + f" tensors) in "
               f"{self.seconds:.1f}s"]
        inexact = [t for t in self.tensors if not t.exact]
        if inexact:
            q41 = [t for t in inexact if t.type == "Q4_1"]
            if q41:
                worst = max(q41, key=lambda t: t.rel_rms)
                errs = [t.rel_rms for t in q41]
                out.append(f"not exact: {len(q41)} Q4_1 tensors (m = -scale x zero point rounded "
                           f"to float16): relative RMS error vs the bundle's weights median "
                           f"{np.median(errs):.2e}, max {max(errs):.2e} ({worst.name})")
            other = [t for t in inexact if t.type != "Q4_1"]
            for t in other:
                out.append(f"not exact: {t.name} written as {t.type} ({t.note or 'nearest type'})"
                           f": relative RMS error {t.rel_rms:.2e}")
        else:
            out.append("every tensor holds the bundle's numbers exactly")
        out += self.notes
        if self.modelfile:
            out.append(f"wrote {self.modelfile} (ollama create NAME -f {self.modelfile.name})")
        return out


def export_gguf(bundle, variant: str, out, force: bool = False, verify: bool = True,
                modelfile: bool = True, progress=None, errors_json: Path | None = None
                ) -> GGUFReport:
    """Write variant `variant` of `bundle` as the GGUF file `out` (and a Modelfile beside it)."""
    import gguf

    from .export_modelfile import modelfile_text

    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise LsaqError(f"{out}: a GGUF export's file name must end in .gguf")
    check_parent(out)
    mf_path = out.with_suffix(".Modelfile") if modelfile else None
    check_target(out, force, gguf_refusal)
    if mf_path is not None:
        check_target(mf_path, force, modelfile_refusal)
    reader = BundleReader.open(bundle, verify=verify)
    v = reader.variant(variant)
    arch = reader.model["architecture"]
    gguf_arch = GGUF_ARCH.get(arch)
    if gguf_arch is None:
        raise LsaqError(f"architecture {arch} has no llama.cpp name this exporter knows: not exported")
    facts = reader.arch_facts(v)
    notes = check_arch(reader, facts, gguf_arch)
    facts.rope = rope_plan(facts, reader.model["head_dim"], gguf_arch)
    head = v["providers"].get("cpu", {}).get("lm_head", "fp16")
    planned = plan_tensors(reader, v, facts, gguf_arch, head)
    mf_text = modelfile_text(reader, out.name) if mf_path is not None else None

    clean_stale(out)
    tmp = tmp_path(out)
    mf_tmp = tmp_path(mf_path) if mf_path is not None else None
    try:
        wr = gguf.GGUFWriter(str(tmp), gguf_arch)
        notes += write_metadata(wr, reader, v, facts, gguf_arch, planned,
                                export_record(reader, variant, "gguf"))
        for p in planned:
            wr.add_tensor_info(p.name, p.shape, np.float32, p.nbytes, raw_dtype=p.gtype)
        wr.write_header_to_file()
        wr.write_kv_data_to_file()
        wr.write_ti_data_to_file()
        for j, p in enumerate(planned):
            a = p.produce()
            if a.nbytes != p.nbytes:
                raise LsaqError(f"{p.name}: {a.nbytes} bytes produced, {p.nbytes} planned")
            wr.write_tensor_data(a)
            if progress and (j % 50 == 0 or j + 1 == len(planned)):
                progress(f"{j + 1}/{len(planned)} tensors")
        wr.close()
        if mf_tmp is not None:
            mf_tmp.write_text(mf_text[0], encoding="utf-8")
        # again: the targets may have appeared while writing
        check_target(out, force, gguf_refusal)
        put_in_place(tmp, out)
        if mf_tmp is not None:
            check_target(mf_path, force, modelfile_refusal)
            put_in_place(mf_tmp, mf_path)
    except OSError as e:
        raise LsaqError(f"{e.filename or out}: cannot write the export ({e.strerror or e}); "
                        "nothing was written: free disk space or choose another -o") from None
    finally:
        for t in (tmp, mf_tmp):
            if t is not None and t.exists():
                t.unlink()
    if mf_text is not None:
        notes += mf_text[1]
    records = [p.record for p in planned]
    rep = GGUFReport(out, mf_path, records, notes, out.stat().st_size, time.perf_counter() - t0)
    if errors_json is not None:
        Path(errors_json).write_text(json.dumps(
            [r.__dict__ for r in records], indent=1), encoding="utf-8")
    return rep
