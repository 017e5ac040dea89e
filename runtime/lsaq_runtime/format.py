"""The LSAQ bundle format, defined once: names, precisions, tensor keys, graph I/O, formulas.

Everything that both halves must spell the same way lives here and only here: the compiler
writes bundles with these names (lsaq_compile imports this module), the runtime reads and
checks them (manifest, graph_check, session, planner). BUNDLE_FORMAT.md describes the same
things in prose; tests/contract/test_architecture.py checks the two agree.

This module holds data and pure functions only: no I/O, no imports beyond the standard library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

# ------------------------------------------------------------------------------- files
MANIFEST = "manifest.json"
# Results `lsaq-compile eval` records beside the manifest (never listed in it: the manifest
# does not change after the build). A bundle's own file, so --force may replace a bundle with it.
EVALUATIONS = "evaluations.json"
SCHEMA_VERSION = 6
# 5 added per-linear precisions (QKV/O/GATE_UP/DOWN); 6 the embedding table and LM head on the
# ladder (variants[].tables), rank_by kl_fp16 and a float32 residual stream in float16 graphs.
# Each only adds: 4 and 5 read as they are.
MIN_SCHEMA_VERSION = 4
FORMAT_NAME = "lsaq-bundle"                            # manifest "format"
TOKENIZER_JSON = "tokenizer.json"                      # inside manifest tokenizer.dir
FLOAT_FILE = "weights/float.safetensors"
WEIGHT_FILES = {"fp16": FLOAT_FILE, "int8": "weights/int8.safetensors",
                "int4": "weights/int4.safetensors"}    # the weight store, one file a precision
# Written by `lsaq-compile build --force` beside the target while it swaps the old bundle for
# the new one; its presence means a build was interrupted mid-swap.
SWAP_JOURNAL = ".{name}.lsaq-swap"


def swap_journal(folder: Path) -> Path:
    """Where a build swapping a new bundle into `folder` keeps its journal (beside it)."""
    return folder.parent / SWAP_JOURNAL.format(name=folder.name)


# ------------------------------------------------------------------------------- vocabulary
METRICS = ("jaccard", "cosine", "zscore", "sensitivity")   # scores.metric: how layers were ranked
RANK_BY = ("precision", "kl_fp16", "measured_quality")     # deployment.rank_by
PRECISIONS = ("fp16", "int8", "int4")              # per decoder layer, or per part of one
BITS = {"int8": 8, "int4": 4}                      # MatMulNBits' `bits` of a quantized precision
ELEM_BYTES = {"float32": 4, "float16": 2}          # activation / KV dtype of a provider's graph

# ------------------------------------------------------------------------------- decoder linears
# How a decoder layer's linears are stored and computed: q/k/v read the same input, as do
# gate/up, so each group is one matmul over its members' weights concatenated by output rows
# (fewer, larger kernels). Stored linear -> its members (HF names, in order).
MEMBERS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
           "self_attn.o_proj": ("self_attn.o_proj",),
           "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
           "mlp.down_proj": ("mlp.down_proj",)}
STORED_LINEARS = tuple(MEMBERS)
# The seven linear weights of a decoder layer as checkpoints name them, in the order above.
LINEAR_NAMES = tuple(m for members in MEMBERS.values() for m in members)
# The stored linears with more than one member (what a fused checkpoint holds as one tensor).
FUSED_LINEARS = {lin: members for lin, members in MEMBERS.items() if len(members) > 1}
# last name component (member or stored) -> stored linear, e.g. "up_proj" -> "mlp.gate_up_proj"
STORED_OF = {n.rsplit(".", 1)[-1]: lin for lin, members in MEMBERS.items() for n in (lin, *members)}
# A layer's parts: its stored linears, by short name, in that order.
PARTS = ("qkv", "o", "gate_up", "down")
LINEAR_PART = dict(zip(STORED_LINEARS, PARTS))


def split_precision(p: str) -> dict[str, str]:
    """{part: precision} over PARTS of a layer precision: one of PRECISIONS when its four
    stored linears agree ("int8"); "ATTN/MLP" when the attention (qkv, o) and MLP (gate_up,
    down) halves differ ("int8/int4"); else "QKV/O/GATE_UP/DOWN" ("int8/int8/int4/int8")."""
    parts = p.split("/")
    if len(parts) == 1:
        parts = parts * 4
    elif len(parts) == 2:
        parts = [parts[0], parts[0], parts[1], parts[1]]
    if len(parts) != 4 or any(x not in PRECISIONS for x in parts):
        raise ValueError(f"layer precision {p!r} is not one of {', '.join(PRECISIONS)}, nor "
                         "ATTN/MLP nor QKV/O/GATE_UP/DOWN of them")
    return dict(zip(PARTS, parts))


def join_precision(parts: dict[str, str]) -> str:
    """The canonical (shortest) layer precision of {part: precision} over PARTS."""
    q, o, g, d = (parts[k] for k in PARTS)
    if q == o == g == d:
        return q
    if q == o and g == d:
        return f"{q}/{g}"
    return f"{q}/{o}/{g}/{d}"


# ------------------------------------------------------------------------------- tensor keys
# A float weight is stored pre-transposed ([K, N]) under "{base}.weight_kn"; a quantized one in
# MatMulNBits' layout under "{base}.{role}" for each QUANT_ROLES role (zero_points only when
# asymmetric; scales in float16 for float16 graphs, scales_f32 for float32 ones).
QUANT_ROLES = ("qweight", "scales", "scales_f32", "zero_points")
FLOAT_ROLE = "weight_kn"

# The token tables: the embedding (read by Gather) and the LM head (a matmul). A tied model has
# one table, used by both, so both get one precision. An fp16 table is stored under its
# checkpoint name; a quantized one under "{TABLE_BASE}.{precision}.{role}".
TABLES = ("embed_tokens", "lm_head")
TABLE_BASE = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}
EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
HEAD_INT8 = "lm_head.int8"   # older bundles' INT8 copy of the LM head (CPU graphs)
FINAL_NORM = "model.norm.weight"
INV_FREQ = "rope.inv_freq"
INV_FREQ_LONG = "rope.inv_freq_long"     # longrope: the frequencies past the original length
INV_FREQ_LOCAL = "rope.local.inv_freq"   # Gemma 3: the sliding layers' own RoPE base
QKV_BIAS_KEY = "self_attn.qkv_proj.bias"


def layer_prefix(i: int) -> str:
    """The prefix of every tensor of decoder layer i (as in Hugging Face checkpoints)."""
    return f"model.layers.{i}"


def layer_key(i: int, name: str) -> str:
    """Key of tensor `name` of decoder layer i (a norm's "input_layernorm.weight", ...)."""
    return f"{layer_prefix(i)}.{name}"


def norm_key(i: int, which: str) -> str:
    return layer_key(i, f"{which}.weight")


def qk_norm_key(i: int) -> str:
    """q_norm tiled over the query heads, then k_norm over the KV heads: [heads + kv_heads,
    head_dim], one RMSNorm over the packed q|k heads (Qwen3, Gemma 3)."""
    return layer_key(i, "self_attn.qk_norm.weight")


def bias_key(i: int) -> str:
    """The q/k/v biases (Qwen2), concatenated like the fused qkv weight."""
    return layer_key(i, QKV_BIAS_KEY)


def linear_base(i: int, lin: str, precision: str) -> str:
    """The prefix of every key of stored linear `lin` of layer i at one precision."""
    return layer_key(i, f"{lin}.{precision}")


def table_base(table: str, precision: str) -> str:
    """The prefix of every key of a quantized token table."""
    return f"{TABLE_BASE[table]}.{precision}"


def quant_keys(base: str, symmetric: bool = False) -> dict[str, str]:
    """Keys of a quantized weight stored under `base`, by role."""
    roles = QUANT_ROLES[:3] if symmetric else QUANT_ROLES
    return {role: f"{base}.{role}" for role in roles}


def linear_keys(i: int, lin: str, precision: str, symmetric: bool = True) -> dict[str, str]:
    """Store keys of stored linear `lin` of layer i at one precision, by role ("fp32" is a
    float precision the compiler's tests use)."""
    base = linear_base(i, lin, precision)
    if precision in ("fp32", "fp16"):
        return {"weight": f"{base}.{FLOAT_ROLE}"}
    return quant_keys(base, symmetric)


def table_keys(table: str, precision: str, symmetric: bool = True) -> dict[str, str]:
    """Store keys of a token table ("embed_tokens" or "lm_head") at one precision, by role."""
    if precision == "fp16":
        return {"weight": EMBED if table == "embed_tokens" else LM_HEAD}
    return quant_keys(table_base(table, precision), symmetric)


_LINEAR_KEY = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj)\.([a-z0-9]+)\.")
_TABLE_KEY = re.compile(r"^(model\.embed_tokens|lm_head)\.(?:weight$|(int8|int4)\.)")
_TABLE_OF_BASE = {base: table for table, base in TABLE_BASE.items()}


class LinearKey(NamedTuple):
    layer: int
    linear: str      # a stored linear, e.g. "mlp.gate_up_proj"
    precision: str   # as written in the key (the checks compare it with the manifest)


class TableKey(NamedTuple):
    table: str       # "embed_tokens" or "lm_head"
    precision: str   # "fp16" for the float table


def parse_linear_key(key: str) -> LinearKey | None:
    """What a decoder linear weight's key says (the inverse of linear_keys), or None."""
    m = _LINEAR_KEY.match(key)
    return LinearKey(int(m.group(1)), m.group(2), m.group(3)) if m else None


def parse_table_key(key: str) -> TableKey | None:
    """What a token table's key says (the inverse of table_keys; HEAD_INT8's keys read as an
    int8 LM head), or None."""
    m = _TABLE_KEY.match(key)
    return TableKey(_TABLE_OF_BASE[m.group(1)], m.group(2) or "fp16") if m else None


# ------------------------------------------------------------------------------- graph I/O
INPUT_IDS = "input_ids"                          # int64 [batch, seq]
SEQLENS_K = "seqlens_k"                          # int32 [batch]: total length - 1 of each row
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"  # int32 scalar
NUM_LOGITS_TO_KEEP = "num_logits_to_keep"        # int64 scalar: last positions to score
STATIC_INPUTS = (INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, NUM_LOGITS_TO_KEEP)
LOGITS = "logits"                                # float32 [batch, n, vocab]
KV_PARTS = ("key", "value")


def past_name(i: int, part: str) -> str:
    """Graph input of layer i's cached keys or values: [batch, kv_heads, past, head_dim]."""
    return f"past_key_values.{i}.{part}"


def present_name(i: int, part: str) -> str:
    """Graph output of layer i's keys or values after this run: [batch, kv_heads, total, head_dim]."""
    return f"present.{i}.{part}"


def kv_names(num_layers: int) -> list[tuple[str, str]]:
    """(past input, present output) of every layer's key and value, in graph order."""
    return [(past_name(i, p), present_name(i, p)) for i in range(num_layers) for p in KV_PARTS]


def graph_inputs(num_layers: int) -> list[str]:
    return [*STATIC_INPUTS, *(past for past, _ in kv_names(num_layers))]


def graph_outputs(num_layers: int) -> list[str]:
    return [LOGITS, *(present for _, present in kv_names(num_layers))]


# ------------------------------------------------------------------------------- formulas
def kv_bytes_per_token(model: dict, dtype: str) -> int:
    """Bytes of KV cache per token and sequence: a key and a value row per layer and KV head."""
    return 2 * model["num_layers"] * model["num_key_value_heads"] * model["head_dim"] * ELEM_BYTES[dtype]


def workspace_bytes(ws: dict, context: int) -> int:
    """Activation memory of a prefill of `context` tokens (BUNDLE_FORMAT.md)."""
    return int(ws["fixed_bytes"] + ws["per_token_bytes"] * context
               + ws["per_token_sq_bytes"] * context * context)


def linear_shapes(hidden: int, heads: int, kv_heads: int, head_dim: int,
                  intermediate: int) -> dict[str, tuple[int, int]]:
    """[N, K] of each stored linear of one decoder layer."""
    return {"self_attn.qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
            "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_up_proj": (2 * intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}


def layer_linear_params(hidden: int, heads: int, kv_heads: int, head_dim: int,
                        intermediate: int) -> int:
    """Weights in one decoder layer's linear projections."""
    shapes = linear_shapes(hidden, heads, kv_heads, head_dim, intermediate)
    return sum(n * k for n, k in shapes.values())


def model_shape(model: dict) -> dict[str, int]:
    """linear_shapes' arguments from a manifest's "model" section."""
    return {"hidden": model["hidden_size"], "heads": model["num_attention_heads"],
            "kv_heads": model["num_key_value_heads"], "head_dim": model["head_dim"],
            "intermediate": model["intermediate_size"]}


def parameter_count(layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
                    intermediate: int, vocab: int, tied: bool, *, sandwich_norms: bool = False,
                    qk_norm: bool = False, qkv_bias: bool = False) -> int:
    """Weights of the whole model (manifest model.num_parameters): decoder linears, token
    tables, norms (two a layer, four with sandwich norms, q/k norms) and q/k/v biases."""
    norms = (4 if sandwich_norms else 2) * hidden + (2 * head_dim if qk_norm else 0) + \
        ((heads + 2 * kv_heads) * head_dim if qkv_bias else 0)
    linears = layer_linear_params(hidden, heads, kv_heads, head_dim, intermediate)
    return layers * (linears + norms) + hidden + (1 if tied else 2) * vocab * hidden
