"""Stage 3: the weight store and the ONNX graphs over it.

`write_weight_store` streams every tensor a bundle needs into weights/*.safetensors, layer by
layer, each tensor once per precision. `build_graph` then writes one variant's graph directly
with onnx.helper: every initializer is external data pointing into the store, so graphs are a
few hundred KB and any number of variants share one copy of the weights.

Graph per decoder layer (ORT fused ops, activation dtype T = float32 for CPU, float16 for CUDA):
  SkipSimplifiedLayerNormalization (residual add + RMSNorm) -> one packed q|k|v projection ->
  [q/k RMSNorm per head] -> GroupQueryAttention (packed QKV, rotary inside, KV cache in/out) ->
  o_proj -> [RMSNorm] -> SkipSimplifiedLayerNorm -> one gate|up projection, Split ->
  SiLU- or GELU-gated MLP -> down_proj -> [RMSNorm].
Bracketed steps are the families' own (model_source.FAMILIES: Qwen3 and Gemma 3 normalise q
and k per head; Gemma 3 normalises the attention and MLP outputs too, scales embeddings by
sqrt(hidden), stores its (1 + w) norms as the factors they are, uses GELU-tanh and per-layer
RoPE bases, and may soft-cap the logits). Every family's specifics are inside the graph: the
runtime runs any bundle the same way.
Projections are MatMul over [K, N] weights (fp16/fp32) or MatMulNBits (int8/int4). The LM head
is Gemm(transB=1) over the fp16 [vocab, hidden] table, shared with the embedding Gather when
tied, or (CPU graphs of quantized variants, optional) MatMulNBits over an INT8 copy. Sliding
windows become GQA's local_window_size (same meaning, tested).
GQA on CPU needs head_dim % 16 == 0; past/present may share one preallocated buffer (tested).
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from lsaq_runtime import format as fmt
from lsaq_runtime.format import (EMBED, FINAL_NORM, FLOAT_FILE, INPUT_IDS, INV_FREQ,
                                 INV_FREQ_LOCAL, INV_FREQ_LONG, KV_PARTS, LINEAR_PART, LM_HEAD,
                                 LOGITS, NUM_LOGITS_TO_KEEP, QKV_BIAS_KEY, SEQLENS_K,
                                 STORED_LINEARS, STORED_OF, TOTAL_SEQUENCE_LENGTH,
                                 WEIGHT_FILES, bias_key, linear_base, norm_key, past_name,
                                 present_name, qk_norm_key, quant_keys, split_precision,
                                 table_base)
from lsaq_runtime.format import MEMBERS as FUSED

from .errors import LsaqError
from .model_source import ACTIVATIONS, QK_NORMS, SANDWICH_NORMS, ModelSource, ModelSpec
from .quantize import QuantScheme, dequantize_torch, quantize
from .store import SafetensorsWriter, TensorRef

__all__ = ["TensorRef", "GraphInfo", "write_weight_store", "build_graph", "save_graph",
           "effective_linear_weight", "rope_inv_freq", "rope_for", "PRECISIONS"]

PRECISIONS = ("fp32", *fmt.PRECISIONS)   # fp32 exists for tests only
STORE_FILES = {"fp32": FLOAT_FILE, **WEIGHT_FILES}
IR_VERSION = 10            # ORT 1.31 rejects newer IR versions
OPSETS = (("", 21), ("com.microsoft", 1))

# The token tables on the ladder: an fp16 table is stored under its HF name (EMBED, LM_HEAD), a
# quantized one in MatMulNBits' layout, which the head's MatMulNBits reads as it is and the
# embedding's Gather reads row by row (a tied model's one table serves both).
QKV_BIAS = ("q_proj", "k_proj", "v_proj")
# The decoder's linears are stored fused (lsaq_runtime.format.MEMBERS): decode runs 211 -> 121
# matmuls a token on SmolLM2. Quantization is per output row, so a group's weights are exactly
# its members' weights side by side.


def act_key(i: int, lin: str) -> str:
    """Key of stored linear `lin`'s activation statistics (mean x^2 of its input, clip
    'mse-act'); members of a fused linear read the same input, so they share it."""
    return fmt.layer_key(i, lin)


def layer_norms(spec: ModelSpec) -> tuple[str, ...]:
    """The hidden-size norms of one decoder layer (as named in the store and in HF)."""
    extra = SANDWICH_NORMS if spec.family.sandwich_norms else ()
    return ("input_layernorm", "post_attention_layernorm", *extra)


def linear_keys(i: int, lin: str, precision: str, scheme: QuantScheme | None) -> dict[str, str]:
    """Store keys of one linear weight at one precision, by role (lsaq_runtime.format)."""
    return fmt.linear_keys(i, lin, precision, scheme is None or scheme.symmetric)


def table_keys(table: str, precision: str, scheme: QuantScheme | None) -> dict[str, str]:
    """Store keys of a token table ("embed_tokens" or "lm_head") at one precision, by role."""
    return fmt.table_keys(table, precision, scheme is None or scheme.symmetric)


def table_scheme(schemes: dict[str, QuantScheme], precision: str) -> QuantScheme:
    """How a token table is quantized: the linears' scheme of that precision, with a plain MSE
    clipping search where theirs weighs by calibration activations (a lookup table's rows have
    no input activations to weigh by)."""
    s = schemes[precision]
    return replace(s, clip="mse") if s.clip == "mse-act" else s


def part_precision(layer_precision: str, lin: str) -> str:
    """The precision of stored linear `lin` (e.g. "mlp.down_proj") in a layer whose precision
    is "P", "ATTN/MLP" or "QKV/O/GATE_UP/DOWN" (BUNDLE_FORMAT.md); lin may also be an HF name
    like "model.layers.3.mlp.up_proj.weight"."""
    names = [c for c in lin.split(".") if c in STORED_OF]   # "...mlp.up_proj.weight" too
    if not names:
        raise LsaqError(f"{lin!r} is not a decoder linear ({', '.join(STORED_OF)})")
    if "/" not in layer_precision:  # one precision for the whole layer (also "fp32", tests' graphs)
        return layer_precision
    try:
        parts = split_precision(layer_precision)
    except ValueError as e:
        raise LsaqError(str(e)) from None
    return parts[LINEAR_PART[STORED_OF[names[-1]]]]


def lin_precisions(layer_precisions, lin: str) -> list[str]:
    """Every precision stored linear `lin` has among a layer's precisions (sorted, unique)."""
    return sorted({part_precision(p, lin) for p in layer_precisions})


def _check_precision(p: str, schemes: dict[str, QuantScheme]) -> None:
    if p not in PRECISIONS:
        raise LsaqError(f"unknown precision {p!r}; use one of {', '.join(PRECISIONS)}")
    if p in ("int8", "int4"):
        s = schemes.get(p)
        if s is None:
            raise LsaqError(f"no quantization scheme given for {p}")
        if s.bits != int(p[3:]):
            raise LsaqError(f"scheme {s.name} does not produce {p} weights")


def _linear_arrays(w: np.ndarray, precision: str, scheme: QuantScheme | None,
                   act: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """What the store holds for HF weight w [N, K] at one precision, by role."""
    if precision == "fp32":
        return {"weight": np.ascontiguousarray(w.T, dtype=np.float32)}
    if precision == "fp16":
        from .devices import contiguous, to_float16   # torch casts: see devices.py

        return {"weight": contiguous(to_float16(np.asarray(w, np.float32)).T)}
    return _quantized_arrays(quantize(w, scheme, act=act))


def _kept(folder: Path | None, layer: int, members, precision: str, scheme: QuantScheme | None):
    """A fused linear's quantization from the members' kept candidates (their rows stacked,
    as the fused weight stacks them), or None unless every member has one."""
    from .quantize import QuantizedTensor, candidate_path, load_candidate

    if folder is None or precision not in ("int8", "int4"):
        return None
    parts = [load_candidate(candidate_path(folder, layer, m, precision), scheme) for m in members]
    if any(q is None for q in parts) or len({(q.k, q.block_size) for q in parts}) != 1:
        return None
    if len(parts) == 1:
        return parts[0]
    zp = [q.zero_points for q in parts]
    return QuantizedTensor(scheme, sum(q.n for q in parts), parts[0].k, parts[0].block_size,
                           np.concatenate([q.packed for q in parts]),
                           np.concatenate([q.scales for q in parts]),
                           None if zp[0] is None else np.concatenate(zp))


TABLE_ROWS = 8192   # the store reads, writes and quantizes a token table this many rows at a time


def _table_rows16(source: ModelSource, name: str) -> list[np.ndarray]:
    """Token table `name` as float16 row ranges of TABLE_ROWS (ModelSource.table_rows: by
    row ranges where the source can; its float32 whole and a float16 copy were 3.1 GB of an
    8B store stage at Llama 3's vocabulary)."""
    from .devices import to_float16   # torch casts: see devices.py

    n = source.table_rows_count(name)
    return [to_float16(source.table_rows(name, a, min(n, a + TABLE_ROWS)))
            for a in range(0, n, TABLE_ROWS)]


def _kept_table(folder: Path | None, table: str, scheme: QuantScheme, shape: tuple):
    """Token table `table` as the whole-plan passes quantized it (from the fp16-rounded
    table, as here), or None where they kept none of this shape."""
    from .quantize import load_table_candidate, table_candidate_path

    if folder is None:
        return None
    q = load_table_candidate(table_candidate_path(folder, table, scheme), scheme)
    return q if q is not None and (q.n, q.k) == tuple(shape) else None


def _quantized_arrays(q) -> dict[str, np.ndarray]:
    # MatMulNBits wants scales in the activation dtype, as initializers (a Cast node feeding
    # them triggers an ORT bug): keep an exact float32 copy for the CPU graph.
    out = {"qweight": q.packed, "scales": q.scales, "scales_f32": q.scales.astype(np.float32)}
    if q.zero_points is not None:
        out["zero_points"] = q.zero_points
    return out


def effective_linear_weight(w: np.ndarray, precision: str, schemes: dict[str, QuantScheme],
                            act: np.ndarray | None = None) -> np.ndarray:
    """float32 [N, K]: exactly the weight the graph computes with for HF weight w (act: its
    input's activation statistics, for clip 'mse-act')."""
    _check_precision(precision, schemes)
    if precision == "fp32":
        return np.asarray(w, dtype=np.float32)
    if precision == "fp16":
        return np.asarray(w, dtype=np.float16).astype(np.float32)
    return quantize(w, schemes[precision], act=act).dequantize()


def table_weight(table: np.ndarray, precision: str, schemes: dict[str, QuantScheme]
                 ) -> np.ndarray:
    """float32 [vocab, hidden]: exactly the token table a graph computes with at `precision`
    (quantized from the fp16-rounded table, as the store holds it)."""
    from .devices import to_float16, to_float32   # torch casts: see devices.py

    t16 = to_float32(to_float16(np.asarray(table, np.float32)))
    if precision == "fp16":
        return t16
    _check_precision(precision, schemes)
    return dequantize_torch(quantize(t16, table_scheme(schemes, precision))).numpy()


def check_supported(source: ModelSource) -> None:
    """Refuse model features the graph does not implement, rather than export wrong math."""
    spec, cfg = source.spec, source.spec.hf_config
    if spec.hidden_act not in ACTIVATIONS:
        raise LsaqError(f"activation {spec.hidden_act!r} is not supported (gated MLPs with "
                        f"{', '.join(ACTIVATIONS)})")
    if cfg.get("mlp_bias") or source.has_tensor("model.layers.0.self_attn.o_proj.bias"):
        raise LsaqError("MLP or o_proj biases are not supported (only q/k/v biases, as in Qwen2)")
    if spec.head_dim % 16:
        raise LsaqError(f"head_dim {spec.head_dim} is not a multiple of 16, which ONNX Runtime's "
                        "GroupQueryAttention requires on CPU")
    rp = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    partial = cfg.get("partial_rotary_factor") or rp.get("partial_rotary_factor") or 1.0
    if float(partial) != 1.0:
        raise LsaqError(f"partial rotary embeddings (partial_rotary_factor {partial}) are not "
                        "supported: every head dimension must rotate")
    if cfg.get("use_bidirectional_attention"):
        raise LsaqError("use_bidirectional_attention is set: bidirectional attention (an "
                        "embedding model's) is not supported; only causal language models")
    bad = sorted(set(spec.layer_types or ()) - {"full_attention", "sliding_attention"})
    if bad:
        raise LsaqError(f"layer types {bad} are not supported (full_attention, sliding_attention)")
    # Gemma 3's attn_logit_softcapping is ignored: transformers' and llama.cpp's Gemma 3 never
    # apply it (only Gemma 2 did), and the graph follows them.
    rope_for(spec)  # raises for unsupported RoPE scaling


# --------------------------------------------------------------------------------------------
# RoPE: the same inverse frequencies transformers computes (float32), so cos/sin match.

@dataclass
class Rope:
    """How one kind of layer rotates q and k."""
    inv_freq: np.ndarray                  # float32 [head_dim/2]; longrope: the short factors'
    attention_factor: float = 1.0         # multiplies cos and sin
    long_inv_freq: np.ndarray | None = None   # longrope: once the sequence is longer than switch
    switch: int | None = None
    # dynamic NTK: (factor, max_position_embeddings, base); past max_position_embeddings the
    # base grows with the sequence length, so the graph computes the frequencies every run
    dynamic: tuple[float, int, float] | None = None

    @property
    def length_dependent(self) -> bool:
        return self.long_inv_freq is not None or self.dynamic is not None


def _pos_freqs(base: float, dim: int) -> np.ndarray:
    """base ** (2i / dim), float32 as transformers computes it; inv_freq is its reciprocal."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return np.float32(base) ** exps


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    return (np.float32(1.0) / _pos_freqs(base, dim)).astype(np.float32)


def rope_for(spec: ModelSpec, local: bool = False) -> Rope:
    """The RoPE of the model's (global) layers, or of Gemma 3's sliding layers (local)."""
    dim = spec.head_dim
    if local:
        return Rope(_default_inv_freq(spec.local_rope_theta, dim))
    base = spec.rope_theta
    pos_freqs = _pos_freqs(base, dim)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    rs = dict(spec.rope_scaling or {})
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return Rope(inv_freq)
    if kind in ("linear", "dynamic", "yarn", "llama3") and "factor" not in rs:
        raise LsaqError(f"RoPE scaling {kind!r} needs a factor; the config's rope_scaling has none")
    factor = float(rs.get("factor", 1.0))
    if kind == "linear":
        return Rope((inv_freq / np.float32(factor)).astype(np.float32))
    original = rs.get("original_max_position_embeddings") or spec.max_position_embeddings
    if kind == "llama3":
        low_ff, high_ff = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
        low_wavelen, high_wavelen = original / low_ff, original / high_ff
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return Rope(np.where(medium, smoothed, scaled).astype(np.float32))
    if kind == "yarn":
        return Rope(*_yarn(rs, dim, base, factor, original, pos_freqs))
    if kind == "dynamic":
        # transformers: past max_position_embeddings (not any original length) the base becomes
        # base * (factor * len / max - (factor - 1)) ** (dim / (dim - 2)) for the current length
        return Rope(inv_freq, dynamic=(factor, int(spec.max_position_embeddings), float(base)))
    if kind == "longrope":
        short, long = rs.get("short_factor"), rs.get("long_factor")
        if not (isinstance(short, list) and isinstance(long, list)
                and len(short) == len(long) == dim // 2):
            raise LsaqError(f"longrope needs short_factor and long_factor lists of head_dim/2 = "
                            f"{dim // 2} numbers each")
        f = rs.get("factor") or spec.max_position_embeddings / original
        attention = rs.get("attention_factor")
        if attention is None:  # transformers' default (LongRoPE paper)
            attention = 1.0 if f <= 1.0 else math.sqrt(1 + math.log(f) / math.log(original))
        def inv(ext):
            return (np.float32(1.0) / (np.asarray(ext, np.float32) * pos_freqs)).astype(np.float32)

        if list(short) == list(long):  # one set of factors (a GGUF's rope_freqs): fixed
            return Rope(inv(short), float(attention))
        # transformers switches to the long factors once max(position) + 1 exceeds the original
        # length, for the whole forward call; cached keys keep the rotation they were made with
        return Rope(inv(short), float(attention), inv(long), int(original))
    raise LsaqError(f"RoPE scaling {kind!r} is not supported "
                    "(default, linear, llama3, yarn, dynamic, longrope)")


def rope_inv_freq(spec: ModelSpec) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim/2], attention factor applied to cos and sin) of the global
    layers at short lengths (what transformers' rotary module holds after construction)."""
    r = rope_for(spec)
    return r.inv_freq, r.attention_factor


def _yarn(rs: dict, dim: int, base: float, factor: float, original: int, pos_freqs: np.ndarray
          ) -> tuple[np.ndarray, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rs.get("attention_factor")
    if attention is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
    return inv_freq.astype(np.float32), float(attention)


def rope_tables(spec: ModelSpec) -> dict[str, np.ndarray]:
    """The inverse-frequency tensors the graphs read, by store key."""
    g = rope_for(spec)
    out = {INV_FREQ: g.inv_freq}
    if g.long_inv_freq is not None:
        out[INV_FREQ_LONG] = g.long_inv_freq
    if any(spec.uses_local_rope(i) for i in range(spec.num_layers)):
        out[INV_FREQ_LOCAL] = rope_for(spec, local=True).inv_freq
    return out


# --------------------------------------------------------------------------------------------
# Weight store

def write_weight_store(source: ModelSource, bundle_dir: Path,
                       layer_precisions: dict[int, set[str]], schemes: dict[str, QuantScheme],
                       progress: Callable[[str], None] | None = None,
                       head_int8: bool = False,
                       act_stats: dict[str, np.ndarray] | None = None,
                       table_precisions: dict[str, set[str]] | None = None,
                       candidates: Path | None = None) -> dict[str, TensorRef]:
    """Write weights/{float,int8,int4}.safetensors (only those that get tensors); return the
    index of every stored tensor. Works one decoder layer at a time. head_int8: also store the
    LM head quantized with the INT8 scheme, for CPU graphs whose head is otherwise fp16.
    act_stats: activation statistics by act_key (activations.activation_stats), needed by
    schemes with clip 'mse-act'. table_precisions: the quantized precisions each token table
    ("embed_tokens", "lm_head") is needed at (a tied model's one table is "embed_tokens"); the
    fp16 tables are always stored (the FP16 variant reads them). candidates: the folder where
    the fisher estimate kept every linear it quantized (quantize.candidate_path) and the
    passes every quantized head (table_candidate_path): those are read instead of quantized
    again (the clipping search is most of this stage's time), the same bytes, since every row
    is quantized alone and a fused linear is its members' rows."""
    spec = source.spec
    check_supported(source)
    bundle_dir = Path(bundle_dir)
    missing = [i for i in range(spec.num_layers) if not layer_precisions.get(i)]
    if missing:
        raise LsaqError(f"no precision given for decoder layer(s) {missing}")
    for precs in layer_precisions.values():
        for lin in STORED_LINEARS:
            for p in lin_precisions(precs, lin):
                _check_precision(p, schemes)
    untied = not spec.tie_word_embeddings and source.has_tensor(LM_HEAD)
    biases = [p for p in QKV_BIAS
              if spec.attention_bias and source.has_tensor(f"model.layers.0.self_attn.{p}.bias")]

    ropes = rope_tables(spec)
    offset = np.float32(spec.family.norm_offset)   # Gemma's (1 + w): the graph multiplies by it

    tables = {t: set(p) - {"fp16"} for t, p in (table_precisions or {}).items()}
    if not untied and tables.get("lm_head"):
        raise LsaqError("this model's LM head is its embedding table (tied): give the head's "
                        "precisions as the embed_tokens table's")
    if head_int8:   # the CPU head's INT8 copy is the int8 table itself
        _check_precision("int8", schemes)
        tables.setdefault("lm_head" if untied else "embed_tokens", set()).add("int8")
    plan: dict[str, list[str]] = defaultdict(list)
    plan[FLOAT_FILE] += [EMBED] + ([LM_HEAD] if untied else []) + [FINAL_NORM, *ropes]
    for t, precs in tables.items():
        for p in sorted(precs):
            _check_precision(p, schemes)
            plan[STORE_FILES[p]] += table_keys(t, p, table_scheme(schemes, p)).values()
    for i in range(spec.num_layers):
        plan[FLOAT_FILE] += [norm_key(i, n) for n in layer_norms(spec)]
        plan[FLOAT_FILE] += [qk_norm_key(i)] if spec.family.qk_norm else []
        plan[FLOAT_FILE] += [bias_key(i)] if biases else []
        for lin in STORED_LINEARS:
            for p in lin_precisions(layer_precisions[i], lin):
                plan[STORE_FILES[p]] += linear_keys(i, lin, p, schemes.get(p)).values()

    index: dict[str, TensorRef] = {}
    with ExitStack() as stack:
        writers = {f: stack.enter_context(SafetensorsWriter(bundle_dir, f, names))
                   for f, names in plan.items()}
        file_of = {k: f for f, names in plan.items() for k in names}

        def put(key: str, array: np.ndarray) -> None:
            index[key] = writers[file_of[key]].add(key, array)

        for t in ("embed_tokens", "lm_head") if untied else ("embed_tokens",):
            name = EMBED if t == "embed_tokens" else LM_HEAD
            rows = _table_rows16(source, name)   # float16 row ranges, never the float32 whole
            index[name] = writers[file_of[name]].add_rows(name, rows)
            shape = (sum(len(r) for r in rows), rows[0].shape[1])
            for p in sorted(tables.get(t, ())):
                # From the fp16-rounded table the float graphs use, so quantizing only adds its
                # own error; by row ranges, each row alone (the same bytes as the whole).
                sch = table_scheme(schemes, p)
                keys = table_keys(t, p, sch)
                kept = _kept_table(candidates, t, sch, shape)
                parts = [_quantized_arrays(q) for q in ([kept] if kept is not None else
                                                        (quantize(r, sch) for r in rows))]
                for role in parts[0]:   # written by row ranges, not joined (0.5 GB at 8B INT8)
                    index[keys[role]] = writers[file_of[keys[role]]].add_rows(
                        keys[role], [a[role] for a in parts])
                del parts, kept
                if progress:
                    progress(f"stored the {t} table at {p}")
            del rows
        put(FINAL_NORM, source.tensor(FINAL_NORM) + offset)
        for key, inv_freq in ropes.items():
            put(key, inv_freq)
        for i in range(spec.num_layers):
            t = source.layer_tensors(i)
            for which in layer_norms(spec):
                put(norm_key(i, which), t[f"{which}.weight"] + offset)
            if spec.family.qk_norm:
                q, k = (t[f"{n}.weight"] + offset for n in QK_NORMS)
                put(qk_norm_key(i), np.concatenate([np.tile(q, (spec.num_heads, 1)),
                                                    np.tile(k, (spec.num_kv_heads, 1))]))
            if biases:
                put(bias_key(i), np.concatenate([
                    t[f"self_attn.{p}.bias"] if p in biases else
                    np.zeros(t[f"self_attn.{p}.weight"].shape[0], np.float32) for p in QKV_BIAS]))
            for lin in STORED_LINEARS:
                w = np.concatenate([t.pop(f"{m}.weight") for m in FUSED[lin]], axis=0)
                for p in lin_precisions(layer_precisions[i], lin):
                    keys = linear_keys(i, lin, p, schemes.get(p))
                    act = (act_stats or {}).get(act_key(i, lin))
                    kept = _kept(candidates, i, FUSED[lin], p, schemes.get(p))
                    for role, arr in (_quantized_arrays(kept) if kept is not None else
                                      _linear_arrays(w, p, schemes.get(p), act)).items():
                        put(keys[role], arr)
            if progress:
                progress(f"stored layer {i + 1}/{spec.num_layers}")
    return index


# --------------------------------------------------------------------------------------------
# Graph

@dataclass
class GraphInfo:
    referenced: dict[str, int]       # store key -> bytes, every tensor the graph references
    weight_bytes: int                # exact sum of referenced
    resident_bytes: int              # estimated weight memory held by the provider after load
    decoder_linear_bytes: list[int]  # per decoder layer: its 7 linear weights incl. scales/zp
    creation_extra_bytes: int = 0    # held only while the session is created (see below)


_ONNX_DTYPES = {"float16": TensorProto.FLOAT16, "float32": TensorProto.FLOAT,
                "uint8": TensorProto.UINT8}


class _GraphBuilder:
    def __init__(self, index: dict[str, TensorRef], dtype: str, accuracy_level: int = 0,
                 residual_dtype: str | None = None):
        self.index = index
        self.dtype = dtype
        self.T = _ONNX_DTYPES[dtype]
        # The residual stream and norms: the activation dtype, or float32 in a float16 graph
        # whose float16 residual overflows (a real Gemma 3 reaches |h| = 103,795 > 65,504).
        self.residual_dtype = residual_dtype or dtype
        self.R = _ONNX_DTYPES[self.residual_dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        # How the provider will hold each weight: "direct" (as stored), "upcast" (an fp16
        # weight cast to fp32 for MatMul/Gemm: constant folding makes a fp32 copy) or "gather"
        # (an embedding table: on CPU it stays memory-mapped and only looked-up rows are paged
        # in, measured as ~0 by benchmarks/bench_memory.py; on CUDA it is copied to the device).
        self.uses: dict[str, set[str]] = defaultdict(set)
        self.extra_resident = 0      # memory kernels add beyond the stored bytes
        self.accuracy_level = accuracy_level   # of every MatMulNBits node
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}/{self._count}"

    def op(self, op_type: str, inputs: list[str], hint: str, outputs: int | list[str] = 1,
           domain: str = "", **attrs):
        outs = [self.fresh(hint) for _ in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.fresh(op_type),
                                           domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, values, dtype, hint: str) -> str:
        arr = np.asarray(values, dtype=dtype)
        return self.op("Constant", [], hint, value=onnx.numpy_helper.from_array(arr))

    def weight(self, key: str, use: str = "direct") -> str:
        """An external initializer pointing into the store (named by its store key)."""
        ref = self.index.get(key)
        if ref is None:
            raise LsaqError(f"the weight store lacks {key}; was it written for this variant's "
                            "precisions?")
        if key not in self.initializers:
            t = TensorProto()
            t.name = key
            t.data_type = _ONNX_DTYPES[ref.dtype]
            t.dims.extend(ref.shape)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", ref.file), ("offset", str(ref.offset)),
                         ("length", str(ref.length))):
                e = t.external_data.add()
                e.key, e.value = k, v
            self.initializers[key] = t
        self.uses[key].add(use)
        return key

    def weight_as_T(self, key: str, consumer_is_matmul: bool = False, dtype: str | None = None
                    ) -> str:
        """A float weight in the graph's dtype, or `dtype` (Cast when stored otherwise)."""
        dtype = dtype or self.dtype
        ref = self.index.get(key)
        if ref is not None and ref.dtype == dtype:
            return self.weight(key)
        upcast = consumer_is_matmul and dtype == "float32"
        name = self.weight(key, "upcast" if upcast else "direct")
        suffix = "as_T" if dtype == self.dtype else f"as_{dtype}"
        return self.op("Cast", [name], f"{key}/{suffix}", to=_ONNX_DTYPES[dtype])

    def to(self, x: str, elem: int, hint: str) -> str:
        """x cast to ONNX element type `elem`; only called where the types differ."""
        return self.op("Cast", [x], hint, to=elem)

    def resident_bytes(self) -> int:
        """Weight memory the provider holds after the session is created. Measured on the CPU
        provider (benchmarks/bench_memory.py, RssAnon and RssFile apart): a weight a kernel
        prepacks is held once as its packed copy; an fp16 weight cast for MatMul/Gemm twice (its
        float32 copy); a table only gathered from stays memory-mapped, rows paged in as looked
        up (about 0); but a quantized table that the head prepacks *and* the embedding gathers
        from stays mapped in full beside the packed copy: twice its bytes. CUDA copies every
        weight to the device once."""
        def copies(uses: set[str]) -> int:
            if self.dtype == "float16":
                return 1
            mapped_and_packed = "gather" in uses and "direct" in uses
            return ("direct" in uses) + mapped_and_packed + 2 * ("upcast" in uses)
        return self.extra_resident + sum(self.index[key].length * copies(uses)
                                         for key, uses in self.uses.items())

    def creation_extra_bytes(self) -> int:
        """Memory held only while the session is created, on top of resident_bytes: ONNX
        Runtime folds each Cast of an fp16 weight into a float32 copy and then moves it into
        place, one weight at a time, so the transient is the float32 size of the largest cast
        weight (measured: SmolLM2's 108 MiB head, a 262k-vocabulary head's 64 MiB; a real
        Gemma 3's head would be 671 MB). Released before the KV cache is allocated."""
        if self.dtype == "float16":
            return 0
        return max((2 * self.index[key].length for key, uses in self.uses.items()
                    if "upcast" in uses), default=0)


def build_graph(spec: ModelSpec, precisions: list[str], index: dict[str, TensorRef], dtype: str,
                max_context: int, name: str = "model", accuracy_level: int = 0,
                lm_head: str = "fp16", embed: str = "fp16", residual_dtype: str | None = None
                ) -> tuple[onnx.ModelProto, GraphInfo]:
    """One variant's graph; precisions has one entry per decoder layer. accuracy_level goes to
    every MatMulNBits node: 0 computes in the activation dtype (exact), 4 quantizes activations
    to int8 per block and uses ORT's integer kernels (CPU). lm_head: "fp16" (Gemm over the
    float table) or "int8"/"int4" (MatMulNBits over the quantized head table: the tied
    embedding's, or lm_head's). embed: the precision of the embedding table the graph gathers
    rows from (stored by write_weight_store). residual_dtype: "float32" keeps the residual
    stream and norms of a float16 graph in float32 (matmuls, attention and the KV cache stay
    float16), for models whose residual overflows float16."""
    if lm_head not in ("fp16", "int8", "int4"):
        raise LsaqError(f"lm_head must be fp16, int8 or int4, not {lm_head!r}")
    if embed not in ("fp16", "int8", "int4"):
        raise LsaqError(f"embed must be fp16, int8 or int4, not {embed!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise LsaqError(f"accuracy_level must be 0-4, not {accuracy_level}")
    if dtype not in ("float32", "float16"):
        raise LsaqError(f"graph dtype {dtype!r} not supported; use float32 (CPU) or float16 (CUDA)")
    if len(precisions) != spec.num_layers:
        raise LsaqError(f"{len(precisions)} precisions given for {spec.num_layers} decoder layers")
    if max_context < 1:
        raise LsaqError(f"max_context must be positive, got {max_context}")
    if residual_dtype not in (None, dtype, "float32"):
        raise LsaqError(f"residual_dtype must be float32 or the graph's {dtype}, not "
                        f"{residual_dtype!r}")
    g = _GraphBuilder(index, dtype, accuracy_level, residual_dtype)
    T, R, hd = g.T, g.R, spec.head_dim
    eps = float(spec.rms_norm_eps)

    inputs = [
        helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []),
        helper.make_tensor_value_info(NUM_LOGITS_TO_KEEP, TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT,
                                             ["batch", "num_logits", spec.vocab_size])]
    for i in range(spec.num_layers):
        for kv in KV_PARTS:
            inputs.append(helper.make_tensor_value_info(
                past_name(i, kv), T, ["batch", spec.num_kv_heads, "past_sequence", hd]))
            outputs.append(helper.make_tensor_value_info(
                present_name(i, kv), T, ["batch", spec.num_kv_heads, "total_sequence", hd]))

    ropes = {local: _rotary_cache(g, spec, max_context, local)
             for local in sorted({spec.uses_local_rope(i) for i in range(spec.num_layers)})}
    act = ACTIVATIONS[spec.hidden_act]
    sandwich = spec.family.sandwich_norms

    if embed == "fp16":
        x = g.op("Gather", [g.weight(EMBED, "gather"), INPUT_IDS], "embed", axis=0)
        if g.residual_dtype == "float32":
            x = g.op("Cast", [x], "embed_R", to=R)
    else:
        x = _gather_quantized(g, table_base("embed_tokens", embed), int(embed[3:]),
                              spec.hidden_size)
    if spec.embed_scale is not None:  # Gemma: in the activation dtype, as transformers does
        x = g.op("Mul", [x, g.const(spec.embed_scale, np.float32 if g.residual_dtype == "float32"
                                    else np.float16, "embed_scale")], "embed_scaled")
    h = _rms_norm(g, x, norm_key(0, "input_layernorm"), eps, x_dtype=g.residual_dtype)
    residual = x
    linear_bytes = []
    for i, p in enumerate(precisions):
        qkv = _linear(g, h, i, "self_attn.qkv_proj", p, spec)
        if spec.family.qk_norm:
            qkv = _qk_norm(g, qkv, i, spec, eps)
        attn_attrs = dict(num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
                          scale=spec.attention_scale, do_rotary=1, rotary_interleaved=0)
        window = spec.layer_window(i)
        if window:
            # Same meaning as HF's sliding_window: a token sees `window` positions, itself
            # included (checked against transformers in the tests).
            attn_attrs["local_window_size"] = window
        cos, sin = ropes[spec.uses_local_rope(i)]
        attn, _, _ = g.op(
            "GroupQueryAttention",
            # packed q|k|v in the query input (key and value left out)
            [qkv, "", "", past_name(i, "key"), past_name(i, "value"), SEQLENS_K,
             TOTAL_SEQUENCE_LENGTH, cos, sin], f"layers.{i}/attn",
            outputs=[g.fresh(f"layers.{i}/attn"), present_name(i, "key"), present_name(i, "value")],
            domain="com.microsoft", **attn_attrs)
        o = _linear(g, attn, i, "self_attn.o_proj", p, spec)
        if sandwich:  # Gemma 3: post_attention_layernorm normalises the attention output
            o = _rms_norm(g, o, norm_key(i, "post_attention_layernorm"), eps, out=R)
        elif R != T:
            o = g.to(o, R, f"layers.{i}/o_R")
        h, residual = _skip_norm(g, o, residual, norm_key(
            i, "pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"), eps)
        if R != T:
            h = g.to(h, T, f"layers.{i}/mlp_in_T")
        gate, up = g.op("Split", [_linear(g, h, i, "mlp.gate_up_proj", p, spec)],
                        f"layers.{i}/gate_up", outputs=2, axis=-1, num_outputs=2)
        if act == "silu":
            a = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"layers.{i}/sigmoid")],
                     f"layers.{i}/silu")
        else:  # opset 20's Gelu, tanh approximation (gelu_pytorch_tanh)
            a = g.op("Gelu", [gate], f"layers.{i}/gelu", approximate="tanh")
        gated = g.op("Mul", [a, up], f"layers.{i}/gated")
        down = _linear(g, gated, i, "mlp.down_proj", p, spec)
        if sandwich:
            down = _rms_norm(g, down, norm_key(i, "post_feedforward_layernorm"), eps, out=R)
        elif R != T:
            down = g.to(down, R, f"layers.{i}/down_R")
        last = i + 1 == spec.num_layers
        h, residual = _skip_norm(g, down, residual,
                                 FINAL_NORM if last else norm_key(i + 1, "input_layernorm"), eps,
                                 want_sum=not last)
        if R != T:
            h = g.to(h, T, f"layers.{i}/out_T")
        prefixes = tuple(f"{linear_base(i, lin, part_precision(p, lin))}."
                         for lin in STORED_LINEARS)
        linear_bytes.append(sum(index[key].length for key in g.initializers
                                if key.startswith(prefixes)))

    # Keep the last n positions (n = 0 keeps all, as in transformers).
    n = g.op("Unsqueeze", [NUM_LOGITS_TO_KEEP, g.const([0], np.int64, "axis0")], "n")
    end = g.const([np.iinfo(np.int64).max], np.int64, "end")
    last_h = g.op("Slice", [h, g.op("Neg", [n], "neg_n"), end, g.const([1], np.int64, "axis1")],
                  "last_hidden")
    flat = g.op("Reshape", [last_h, g.const([-1, spec.hidden_size], np.int64, "flat_shape")],
                "flat_hidden")
    if lm_head != "fp16":
        untied = not spec.tie_word_embeddings and LM_HEAD in index
        base = table_base("lm_head" if untied else "embed_tokens", lm_head)
        logits = _matmul_nbits(g, flat, base, int(lm_head[3:]), spec.hidden_size,
                               spec.vocab_size, "lm_head")
    else:
        head = EMBED if spec.tie_word_embeddings or LM_HEAD not in index else LM_HEAD
        # Gemm with transB reads the [vocab, hidden] table in place: tied embeddings need no
        # transposed copy.
        logits = g.op("Gemm", [flat, g.weight_as_T(head, consumer_is_matmul=True)], "lm_head",
                      transB=1)
    out_shape = g.op("Concat", [g.op("Shape", [last_h], "bn", start=0, end=2),
                                g.const([spec.vocab_size], np.int64, "vocab")], "logits_shape",
                     axis=0)
    if dtype == "float16":
        logits = g.op("Cast", [logits], "logits_f32", to=TensorProto.FLOAT)
    cap = spec.final_logit_softcapping
    if cap:  # Gemma: logits = cap * tanh(logits / cap)
        c = g.const(float(cap), np.float32, "softcap")
        logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, c], "softcap_div")],
                                   "softcap_tanh"), c], "softcapped")
    g.op("Reshape", [logits, out_shape], LOGITS, outputs=[LOGITS])

    graph = helper.make_graph(g.nodes, name, inputs, outputs,
                              initializer=list(g.initializers.values()))
    model = helper.make_model(graph, ir_version=IR_VERSION, producer_name="lsaq-compile",
                              opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS])
    referenced = {k: index[k].length for k in g.initializers}
    # cos and sin of every rotary cache ORT folds into constants at session creation
    folded = sum(not rope_for(spec, local).length_dependent for local in ropes)
    cache_bytes = folded * 2 * max_context * (hd // 2) * (4 if dtype == "float32" else 2)
    info = GraphInfo(referenced=referenced, weight_bytes=sum(referenced.values()),
                     resident_bytes=g.resident_bytes() + cache_bytes,
                     decoder_linear_bytes=linear_bytes,
                     creation_extra_bytes=g.creation_extra_bytes())
    return model, info


def _rotary_cache(g: _GraphBuilder, spec: ModelSpec, max_context: int, local: bool = False
                  ) -> tuple[str, str]:
    """cos/sin tables for GQA, [positions, head_dim/2], from the stored inv_freq; positions are
    multiplied in float32 exactly as transformers does.

    A fixed RoPE's table covers max_context positions and only constants feed it, so ORT folds
    it into two initializers at session creation. A length-dependent one (longrope, dynamic NTK)
    picks its frequencies from total_sequence_length every run, as transformers does per forward
    call, and computes only the new tokens' rows: GQA reads the rows of the positions it rotates
    (the cached keys were rotated when they were new), so the rows before them are zeros."""
    rope = rope_for(spec, local)
    tag = "rope_local" if local else "rope"
    key = INV_FREQ_LOCAL if local else INV_FREQ
    if not rope.length_dependent:
        start = g.const(0.0, np.float32, f"{tag}/pos0")
        end = g.const(float(max_context), np.float32, f"{tag}/pos_end")
        inv = g.weight(key)
    else:
        total = g.op("Cast", [TOTAL_SEQUENCE_LENGTH], f"{tag}/total", to=TensorProto.FLOAT)
        new = g.op("Gather", [g.op("Shape", [INPUT_IDS], f"{tag}/ids_shape"),
                              g.const(1, np.int64, f"{tag}/seq_axis")], f"{tag}/new_tokens")
        start = g.op("Sub", [total, g.op("Cast", [new], f"{tag}/new_f", to=TensorProto.FLOAT)],
                     f"{tag}/first_new")
        end = total
        if rope.long_inv_freq is not None:
            longer = g.op("Greater", [total, g.const(float(rope.switch), np.float32,
                                                     f"{tag}/original_len")], f"{tag}/is_long")
            inv = g.op("Where", [longer, g.weight(INV_FREQ_LONG), g.weight(key)],
                       f"{tag}/inv_freq")
        else:
            factor, mpe, base = rope.dynamic
            dim = spec.head_dim
            f32 = lambda v, h: g.const(v, np.float32, f"{tag}/{h}")  # noqa: E731
            seq = g.op("Max", [total, f32(float(mpe), "max_pos")], f"{tag}/seq")
            ratio = g.op("Sub", [g.op("Div", [g.op("Mul", [seq, f32(factor, "factor")],
                                                   f"{tag}/f_seq"), f32(float(mpe), "mpe")],
                                      f"{tag}/f_ratio"), f32(factor - 1.0, "factor_m1")],
                         f"{tag}/ratio")
            grown = g.op("Mul", [f32(base, "base"), g.op("Pow", [ratio, f32(dim / (dim - 2), "exp")],
                                                          f"{tag}/ratio_pow")], f"{tag}/base")
            exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
            dyn = g.op("Reciprocal", [g.op("Pow", [grown, f32(exps, "exps")], f"{tag}/pos_freqs")],
                       f"{tag}/inv_dyn")
            # at or below the maximum, the stored (exact) frequencies, as transformers resets to
            longer = g.op("Greater", [total, f32(float(mpe), "mpe_gt")], f"{tag}/is_long")
            inv = g.op("Where", [longer, dyn, g.weight(key)], f"{tag}/inv_freq")
    pos = g.op("Range", [start, end, g.const(1.0, np.float32, f"{tag}/pos_step")],
               f"{tag}/positions")
    pos = g.op("Unsqueeze", [pos, g.const([1], np.int64, f"{tag}/axis1")], f"{tag}/positions_col")
    freqs = g.op("Mul", [pos, inv], f"{tag}/freqs")
    out = []
    for fn in ("Cos", "Sin"):
        c = g.op(fn, [freqs], f"{tag}/{fn.lower()}")
        if rope.attention_factor != 1.0:
            c = g.op("Mul", [c, g.const(rope.attention_factor, np.float32,
                                        f"{tag}/attention_factor")], f"{tag}/{fn.lower()}")
        if g.dtype == "float16":
            c = g.op("Cast", [c], f"{tag}/{fn.lower()}_T", to=g.T)
        if rope.length_dependent:
            first = g.op("Cast", [start], f"{tag}/first_i", to=TensorProto.INT64)
            pads = g.op("Concat", [g.op("Unsqueeze", [first, g.const([0], np.int64, f"{tag}/ax0")],
                                        f"{tag}/first_1d"),
                                   g.const([0, 0, 0], np.int64, f"{tag}/pads_rest")],
                        f"{tag}/pads", axis=0)
            c = g.op("Pad", [c, pads], f"{tag}/{fn.lower()}_padded")
        out.append(c)
    return out[0], out[1]


def _qk_norm(g: _GraphBuilder, qkv: str, i: int, spec: ModelSpec, eps: float) -> str:
    """RMSNorm over each head of q and k inside the packed q|k|v (Qwen3, Gemma 3): q and k
    viewed as [batch, seq, heads + kv_heads, head_dim] take one norm with the tiled weights."""
    hint = f"layers.{i}/qk_norm"
    hd = spec.head_dim
    qk_heads = spec.num_heads + spec.num_kv_heads
    qk, v = g.op("Split", [qkv, g.const([qk_heads * hd, spec.num_kv_heads * hd], np.int64,
                                         f"{hint}/sizes")], hint, outputs=2, axis=-1)
    heads = g.op("Reshape", [qk, g.const([0, 0, qk_heads, hd], np.int64, f"{hint}/heads")],
                 f"{hint}/by_head")
    normed = _rms_norm(g, heads, qk_norm_key(i), eps)
    flat = g.op("Reshape", [normed, g.const([0, 0, qk_heads * hd], np.int64, f"{hint}/flat")],
                f"{hint}/packed")
    return g.op("Concat", [flat, v], f"{hint}/qkv", axis=-1)


def _linear(g: _GraphBuilder, x: str, i: int, lin: str, layer_precision: str, spec: ModelSpec
            ) -> str:
    precision = part_precision(layer_precision, lin)
    hint = f"layers.{i}/{lin}"
    k_in, n_out = _linear_dims(spec, lin)
    if precision in ("fp32", "fp16"):
        key = linear_keys(i, lin, precision, None)["weight"]
        y = g.op("MatMul", [x, g.weight_as_T(key, consumer_is_matmul=True)], hint)
    else:
        y = _matmul_nbits(g, x, linear_base(i, lin, precision), int(precision[3:]),
                          k_in, n_out, hint)
    if lin == "self_attn.qkv_proj" and bias_key(i) in g.index:
        y = g.op("Add", [y, g.weight_as_T(bias_key(i))], f"{hint}/bias")
    return y


def _stored_quantized(g: _GraphBuilder, base: str, bits: int, what: str
                      ) -> tuple[dict[str, str], tuple[int, int, int]]:
    """The store keys of the quantized weight under `base` and its (rows, blocks, block size)."""
    key = quant_keys(base)
    qref = g.index.get(key["qweight"])
    if qref is None:
        raise LsaqError(f"the weight store lacks {key['qweight']}; was it written for this "
                        f"variant's {what}?")
    n, n_blocks, blob = qref.shape
    return key, (n, n_blocks, blob * 8 // bits)


def _matmul_nbits(g: _GraphBuilder, x: str, base: str, bits: int, k_in: int, n_out: int,
                  hint: str) -> str:
    """x @ W.T for the quantized weight stored under `base` (qweight, scales[, zero_points])."""
    key, (n, n_blocks, block) = _stored_quantized(g, base, bits, "precisions")
    if n != n_out or not 0 <= n_blocks * block - k_in < block:
        raise LsaqError(f"{key['qweight']} has shape {g.index[key['qweight']].shape}, not that of a "
                        f"[{n_out}, {k_in}] weight")
    ins = [g.weight(key["qweight"]),
           g.weight(key["scales_f32"] if g.dtype == "float32" else key["scales"])]
    if g.accuracy_level == 4 and g.dtype == "float32":
        # The int8-activation kernel prepacks a float32 sum per block next to the scales
        # (MLAS "BlkSum"), which the stored bytes do not include.
        g.extra_resident += 4 * n * n_blocks
    if key["zero_points"] in g.index:
        ins.append(g.weight(key["zero_points"]))
    return g.op("MatMulNBits", [x, *ins], hint, domain="com.microsoft", K=k_in, N=n_out,
                bits=bits, block_size=block, accuracy_level=g.accuracy_level)


def _gather_quantized(g: _GraphBuilder, base: str, bits: int, hidden: int) -> str:
    """Rows of a quantized table stored in MatMulNBits' layout (the head's MatMulNBits reads the
    same initializer), dequantized with standard ops: Gather reads only the looked-up rows of
    the memory-mapped codes, scales and zero points, and every provider runs these ops (ORT's
    GatherBlockQuantized would do the same on CPU, but its CUDA support is not verified here)."""
    hint = "embed_q"
    key, (_, n_blocks, block) = _stored_quantized(g, base, bits, "table precision")
    f32 = TensorProto.FLOAT

    def rows(key: str) -> str:
        return g.op("Gather", [g.weight(key, "gather"), INPUT_IDS], f"{hint}/rows", axis=0)

    def nibbles(x: str, tag: str) -> str:
        """uint8 [..., n] -> float32 [..., 2n]: element 2j from the low nibble, as packed.
        In float arithmetic (exact for 0..255), which every provider has."""
        f = g.op("Cast", [x], f"{hint}/{tag}_f", to=f32)
        sixteen = g.const(16.0, np.float32, f"{hint}/{tag}_16")
        hi = g.op("Floor", [g.op("Div", [f, sixteen], f"{hint}/{tag}_div")], f"{hint}/{tag}_hi")
        lo = g.op("Sub", [f, g.op("Mul", [hi, sixteen], f"{hint}/{tag}_hi16")], f"{hint}/{tag}_lo")
        axis = g.const([-1], np.int64, f"{hint}/{tag}_ax")
        pair = g.op("Concat", [g.op("Unsqueeze", [lo, axis], f"{hint}/{tag}_lo1"),
                               g.op("Unsqueeze", [hi, axis], f"{hint}/{tag}_hi1")],
                    f"{hint}/{tag}_pair", axis=-1)
        return g.op("Reshape", [pair, g.const([0, 0, -1], np.int64, f"{hint}/{tag}_flat")],
                    f"{hint}/{tag}_codes")

    # Codes and zero points are small integers, exact in float16 too: the row is computed in the
    # graph's dtype with the scales the head's MatMulNBits reads (fp16 scales in a float16 graph).
    T = g.T
    codes = rows(key["qweight"])                                 # [B, S, nb, blob] uint8
    flat = g.op("Reshape", [codes, g.const([0, 0, -1], np.int64, f"{hint}/flat")],
                f"{hint}/codes_flat")
    codes = nibbles(flat, "codes") if bits == 4 else flat
    codes = g.op("Cast", [codes], f"{hint}/codes_T", to=T)
    codes = g.op("Reshape", [codes, g.const([0, 0, n_blocks, block], np.int64, f"{hint}/blocks")],
                 f"{hint}/codes_blocks")                            # [B, S, nb, block]
    axis = g.const([-1], np.int64, f"{hint}/axis")
    if key["zero_points"] in g.index:
        zp = rows(key["zero_points"])                            # [B, S, ceil(nb*bits/8)]
        zp = g.op("Cast", [nibbles(zp, "zp") if bits == 4 else zp], f"{hint}/zp_T", to=T)
        zp = g.op("Slice", [zp, g.const([0], np.int64, f"{hint}/zp0"),
                            g.const([n_blocks], np.int64, f"{hint}/zpn"), axis], f"{hint}/zp_nb")
        zp = g.op("Unsqueeze", [zp, axis], f"{hint}/zp_col")
    else:   # symmetric: MatMulNBits' implied zero point
        zp = g.const(float(2 ** (bits - 1)), np.float32 if T == f32 else np.float16,
                     f"{hint}/zp_sym")
    scales = rows(key["scales_f32"] if T == f32 else key["scales"])   # [B, S, nb]
    scales = g.op("Unsqueeze", [scales, axis], f"{hint}/scales_col")
    x = g.op("Mul", [g.op("Sub", [codes, zp], f"{hint}/centered"), scales], f"{hint}/deq")
    x = g.op("Reshape", [x, g.const([0, 0, -1], np.int64, f"{hint}/out_flat")], f"{hint}/row")
    if n_blocks * block != hidden:   # the last block's zero padding
        x = g.op("Slice", [x, g.const([0], np.int64, f"{hint}/h0"),
                           g.const([hidden], np.int64, f"{hint}/h1"), axis], f"{hint}/trim")
    if g.R != T:   # a float16 graph with a float32 residual stream
        x = g.op("Cast", [x], f"{hint}/R", to=g.R)
    return x


def _linear_dims(spec: ModelSpec, lin: str) -> tuple[int, int]:
    """(K in, N out) of a stored (fused) decoder linear layer."""
    n, k = fmt.linear_shapes(spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                             spec.head_dim, spec.intermediate_size)[lin]
    return k, n


def _rms_norm(g: _GraphBuilder, x: str, key: str, eps: float, out: int | None = None,
              x_dtype: str | None = None) -> str:
    """RMSNorm from standard ops: opset 21 has no RMSNormalization and ORT's
    SimplifiedLayerNormalization sits in the default domain, which onnx.checker rejects.
    Computed in float32 like transformers, then scaled in the activation dtype (or `out`: the
    residual stream's, for norms whose output joins it). x_dtype: x's dtype (default the
    graph's)."""
    out = g.T if out is None else out
    out_dtype = "float32" if out == TensorProto.FLOAT else g.dtype
    x32 = x if (x_dtype or g.dtype) == "float32" else \
        g.op("Cast", [x], "norm0/x32", to=TensorProto.FLOAT)
    ms = g.op("ReduceMean", [g.op("Mul", [x32, x32], "norm0/sq"),
                             g.const([-1], np.int64, "norm0/axes")], "norm0/ms", keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32, "eps")],
                                                  "norm0/ms_eps")], "norm0/rms")], "norm0/inv")
    y = g.op("Mul", [x32, inv], "norm0/normed")
    if out != TensorProto.FLOAT:
        y = g.op("Cast", [y], "norm0/normed_T", to=out)
    return g.op("Mul", [y, g.weight_as_T(key, dtype=out_dtype)], "norm0/out")


def _skip_norm(g: _GraphBuilder, x: str, skip: str, key: str, eps: float, want_sum: bool = True
               ) -> tuple[str, str | None]:
    """(RMSNorm(x + skip) * gamma, x + skip)."""
    hint = key.removesuffix(".weight")
    ins = [x, skip, g.weight_as_T(key, dtype=g.residual_dtype)]
    if not want_sum:
        return g.op("SkipSimplifiedLayerNormalization", ins, hint, domain="com.microsoft",
                    epsilon=eps), None
    normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", ins, hint,
                               outputs=[g.fresh(hint), "", "", g.fresh(f"{hint}/residual")],
                               domain="com.microsoft", epsilon=eps)
    return normed, total


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Write the .onnx as is: its initializers already point into the store."""
    Path(path).write_bytes(model.SerializeToString())
