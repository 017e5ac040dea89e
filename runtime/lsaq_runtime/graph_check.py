"""Cross-check one variant's graph against the manifest and the weight store, before ONNX Runtime
sees it.

The manifest says what a variant is (precision of each layer, weight files, bytes, KV shapes);
the graph says what actually runs. They must agree, or the runtime would announce one variant
and run another, or size its buffers for a model the graph is not. Checked here:

- external data: only graph initializers may have it; each points at a file the provider entry
  lists (confined to the bundle, resolved from the graph's folder as ONNX Runtime resolves it),
  and at exactly the tensor of the same name, dtype and shape in that file's safetensors header;
  the lengths add up to the provider's `weight_bytes`, and every listed weight file is used;
- bounded work: the variant's weight files may hold at most HASH_FACTOR times the bytes its
  graph reads (plus their headers), so a listed file cannot make a launch hash without end;
- memory: `resident_bytes` is at least what the graph itself implies (`resident_floor`);
- precisions: the decoder linear weights of layer i are stored as `model.layers.{i}.{linear}.
  {precision}.{role}` (BUNDLE_FORMAT.md); each stored linear of a layer uses exactly the
  precision the manifest gives it, and every MatMulNBits node's `bits` matches the precision of the weight it reads;
- interface: the inputs and outputs are exactly those of the format, the KV tensors have the
  provider's dtype and the manifest's [batch, kv_heads, seq, head_dim], logits end in the vocab,
  and every GroupQueryAttention node has the manifest's head counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import LsaqRuntimeError
from .integrity import bundle_path, check_relpath, safetensors_layout
from .manifest import LINEAR_PART, PARTS, TABLES, split_precision
from .onnx_proto import DTYPES, EXTERNAL, GraphFormatError, read_model

LINEAR_WEIGHT = re.compile(
    r"^model\.layers\.(\d+)\.(self_attn\.(?:qkv|o)_proj|mlp\.(?:gate_up|down)_proj)\.([a-z0-9]+)\.")
# A token table: "model.embed_tokens.weight" / "lm_head.weight" (fp16), or quantized
# "{base}.{int8|int4}.{role}" (the LM head's INT8 copy of older bundles is lm_head.int8.*)
TABLE_WEIGHT = re.compile(r"^(model\.embed_tokens|lm_head)\.(?:weight$|(int8|int4)\.)")
_ST_TO_ONNX = {"F32": 1, "U8": 2, "I8": 3, "F16": 10}
_ONNX_ELEM = {"float32": 1, "float16": 10}
_BITS = {"int8": 8, "int4": 4}
HEAD_INT8 = "lm_head.int8"
STATIC_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "num_logits_to_keep")
# A store holds each layer's weights once per precision it is built at (fp16 2 bytes a weight,
# int8 about 1.1 with scales, int4 about 0.6, scales kept in two dtypes): a variant's files hold
# at most about 7 times what its graph reads, at the most quantized variant. Twice that is the
# most a variant may make the runtime hash.
HASH_FACTOR = 16
# Ops that hold their weight input for the session's life, and the bytes per element of the
# float types a Cast of a weight can produce (ONNX TensorProto data types).
_HOLDS_WEIGHT = {"MatMulNBits", "MatMul", "Gemm"}
_ELEM_SIZE = {1: 4, 10: 2, 11: 8, 16: 2, 2: 1, 3: 1}


def resident_floor(g) -> int:
    """A lower bound of the weight bytes the provider holds once the session is created,
    derived from the graph alone; the manifest's `resident_bytes` may not claim less.

    Counted: each external initializer a MatMulNBits, MatMul or Gemm node reads, at its stored
    size, or, when the node reads it through a Cast, at the cast's size (ONNX Runtime folds a
    Cast of a constant into a new constant: a float16 weight cast to float32 holds twice its
    stored bytes). A weight read several ways counts once, at its largest. Left out, so that the
    bound stays below any honest estimate the compiler makes: embeddings (Gather keeps them
    memory-mapped on CPU), norms, kernel extras (prepacked block sums), rotary caches, and any
    term the build's memory model adds (e.g. vocabulary-sized buffers)."""
    external = {t.name: t for t in g.tensors
                if t.where == "initializer" and (t.external or t.data_location == EXTERNAL)}
    consumers: dict[str, list] = {}
    for n in g.nodes:
        for x in n.inputs:
            consumers.setdefault(x, []).append(n)
    held: dict[str, int] = {}
    for name, t in external.items():
        try:
            length = int(t.external.get("length", 0))
        except ValueError:
            continue
        elem = _ELEM_SIZE.get(t.dtype)
        best = 0
        for n in consumers.get(name, []):
            if n.op_type in _HOLDS_WEIGHT:
                best = max(best, length)
            elif n.op_type == "Cast" and elem and n.outputs and any(
                    c.op_type in _HOLDS_WEIGHT for c in consumers.get(n.outputs[0], [])):
                best = max(best, length // elem * _ELEM_SIZE.get(n.ints.get("to"), elem))
        if best:
            held[name] = best
    return sum(held.values())


def _table_precision(name: str) -> str:
    m = TABLE_WEIGHT.match(name)
    return m.group(2) or "fp16"


@dataclass
class GraphFacts:
    weight_files: list[str]
    weight_bytes: int
    precisions: list[str]


def check_graph(root: Path, manifest: dict, variant: dict, provider: str, data: bytes) -> GraphFacts:
    info = variant["providers"][provider]
    where = f"{root / info['graph']}"
    try:
        g = read_model(data)
    except GraphFormatError as e:
        raise LsaqRuntimeError(f"{where}: not a valid ONNX graph ({e}); the bundle is damaged, "
                               "rebuild it") from None

    def bad(msg: str) -> LsaqRuntimeError:
        return LsaqRuntimeError(f"{where}: {msg}; the graph does not match manifest.json "
                                f"(variant {variant['name']!r}, {provider}), rebuild the bundle")

    # -- external data -------------------------------------------------------------------
    declared = [f for f in info["files"] if f != info["graph"]]
    # ONNX Runtime resolves a location from the graph's folder; so does this check.
    folder = PurePosixPath(info["graph"]).parent
    indexes: dict[str, dict] = {}
    headers: dict[str, int] = {}
    used: set[str] = set()
    total = 0
    for t in g.tensors:
        if not t.external and t.data_location != EXTERNAL:
            continue
        if t.where != "initializer":
            raise bad(f"tensor {t.name!r} ({t.where}) has external data; only initializers may")
        if set(t.external) - {"location", "offset", "length", "checksum"} or \
                not {"location", "offset", "length"} <= set(t.external):
            raise bad(f"initializer {t.name!r} has external data keys {sorted(t.external)}")
        loc = (folder / check_relpath(t.external["location"],
                                      f"{where}: initializer {t.name!r}")).as_posix()
        if loc not in declared:
            raise bad(f"initializer {t.name!r} reads {loc!r}, which is not among the variant's "
                      f"files {declared}")
        if loc not in indexes:
            indexes[loc], headers[loc] = safetensors_layout(bundle_path(root, loc, where))
        entry = indexes[loc].get(t.name)
        try:
            off, length = int(t.external["offset"]), int(t.external["length"])
        except ValueError:
            raise bad(f"initializer {t.name!r} has a non-numeric offset or length") from None
        if entry is None:
            raise bad(f"initializer {t.name!r} is not a tensor of {loc}")
        dtype, shape, e_off, e_len = entry
        if (off, length) != (e_off, e_len) or _ST_TO_ONNX.get(dtype) != t.dtype or shape != t.dims:
            raise bad(f"initializer {t.name!r} points at bytes {off}+{length} as "
                      f"{DTYPES.get(t.dtype, t.dtype)}{t.dims}, but {loc} stores it at "
                      f"{e_off}+{e_len} as {dtype}{shape}")
        used.add(loc)
        total += length
    if sorted(used) != sorted(declared):
        raise bad(f"it reads {sorted(used)} but the manifest lists {sorted(declared)}")
    if "weight_bytes" in info and total != info["weight_bytes"]:
        raise bad(f"it references {total} weight bytes, the manifest says {info['weight_bytes']}")
    sizes = {f["path"]: f["bytes"] for f in manifest["files"]}
    stored = sum(sizes.get(f, 0) for f in declared)
    allowed = HASH_FACTOR * total + sum(headers.values())
    if stored > allowed:
        raise bad(f"its weight files hold {stored:,} bytes but it reads only {total:,} of them; "
                  f"a variant's files may hold at most {HASH_FACTOR}x what it reads, so they are "
                  "refused without being hashed")
    floor = resident_floor(g)
    if info["resident_bytes"] < floor:
        raise bad(f"resident_bytes {info['resident_bytes']:,} is less than the {floor:,} bytes "
                  "its matmul weights alone hold once loaded; the manifest understates the "
                  "memory it needs")

    # -- precisions ----------------------------------------------------------------------
    L = manifest["model"]["num_layers"]
    found: list[dict[str, set[str]]] = [{p: set() for p in PARTS} for _ in range(L)]
    for name in g.initializers:
        m = LINEAR_WEIGHT.match(name)
        if m:
            i = int(m.group(1))
            if i >= L:
                raise bad(f"initializer {name!r} belongs to layer {i}, the model has {L} layers")
            found[i][LINEAR_PART[m.group(2)]].add(m.group(3))
    for i, want in enumerate(variant["precisions"]):
        for part, p in split_precision(want).items():
            if found[i][part] != {p}:
                got = ", ".join(sorted(found[i][part])) or "no linear weights"
                raise bad(f"layer {i}'s {part} computes with {got} weights, the manifest says "
                          f"{want}")
    tables = {t: (variant.get("tables") or {}).get(t, "fp16") for t in TABLES}
    gathered = {_table_precision(n.inputs[0]) for n in g.nodes
                if n.op_type == "Gather" and TABLE_WEIGHT.match(n.inputs[0] if n.inputs else "")}
    if gathered != {tables["embed_tokens"]}:
        got = ", ".join(sorted(gathered)) or "no table"
        raise bad(f"its embedding gathers rows of a {got} table, the manifest says "
                  f"{tables['embed_tokens']}")
    cast_of = {n.outputs[0]: n.inputs[0] for n in g.nodes if n.op_type == "Cast" and n.inputs}

    def weight_of(name: str) -> str:   # through the Cast a float table takes on CPU
        return cast_of.get(name, name)

    heads = [n for n in g.nodes if n.op_type in ("MatMulNBits", "Gemm")
             and TABLE_WEIGHT.match(weight_of(n.inputs[1]) if len(n.inputs) > 1 else "")]
    if len(heads) != 1:
        raise bad(f"it has {len(heads)} LM heads over a token table, not one")
    head = heads[0]
    head_p = _table_precision(weight_of(head.inputs[1]))
    if head.op_type == "MatMulNBits" and head.ints.get("bits") != _BITS.get(head_p):
        raise bad(f"the LM head's MatMulNBits has bits={head.ints.get('bits')} over a {head_p} "
                  "table")
    if head_p != info["lm_head"]:
        raise bad(f"its LM head is {head_p}, the manifest says {info['lm_head']}")
    for n in g.nodes:
        if n.op_type != "MatMulNBits":
            continue
        bits = n.ints.get("bits")
        if n is head:
            pass
        else:
            m = LINEAR_WEIGHT.match(n.inputs[1] if len(n.inputs) > 1 else "")
            prec = m.group(3) if m else None
            if prec not in _BITS or bits != _BITS[prec]:
                raise bad(f"a MatMulNBits node with bits={bits} reads {n.inputs[1:2]}")
        level = n.ints.get("accuracy_level", 0)
        if level != info["accuracy_level"]:
            raise bad(f"a MatMulNBits node computes at accuracy_level {level}, the manifest "
                      f"says {info['accuracy_level']}")

    # -- interface and KV shapes -----------------------------------------------------------
    mo = manifest["model"]
    elem = _ONNX_ELEM[info["dtype"]]
    kv = [f"{p}.{i}.{part}" for i in range(L) for p in ("past_key_values",) for part in ("key", "value")]
    present = [f"present.{i}.{part}" for i in range(L) for part in ("key", "value")]
    ins = [v.name for v in g.inputs if v.name not in g.initializers]
    if sorted(ins) != sorted([*STATIC_INPUTS, *kv]):
        raise bad(f"its inputs are not the bundle format's ({len(ins)} inputs, expected "
                  f"{len(STATIC_INPUTS) + len(kv)})")
    outs = [v.name for v in g.outputs]
    if sorted(outs) != sorted(["logits", *present]):
        raise bad(f"its outputs are not the bundle format's ({len(outs)} outputs)")
    for v in [*g.inputs, *g.outputs]:
        if v.name in g.initializers or v.name in STATIC_INPUTS:
            continue
        if v.name == "logits":
            if v.elem_type != 1 or not v.dims or v.dims[-1] != mo["vocab_size"]:
                raise bad(f"logits are {DTYPES.get(v.elem_type)} {v.dims}, expected float32 "
                          f"[batch, n, {mo['vocab_size']}]")
            continue
        d = v.dims or []
        if (v.elem_type != elem or len(d) != 4 or d[1] != mo["num_key_value_heads"]
                or d[3] != mo["head_dim"] or isinstance(d[0], int) or isinstance(d[2], int)):
            raise bad(f"{v.name} is {DTYPES.get(v.elem_type, v.elem_type)} {d}, expected "
                      f"{info['dtype']} [batch, {mo['num_key_value_heads']}, seq, {mo['head_dim']}]")
    gqa = [n for n in g.nodes if n.op_type == "GroupQueryAttention"]
    if len(gqa) != L:
        raise bad(f"it has {len(gqa)} attention nodes for {L} layers")
    for n in gqa:
        if (n.ints.get("num_heads"), n.ints.get("kv_num_heads")) != \
                (mo["num_attention_heads"], mo["num_key_value_heads"]):
            raise bad(f"an attention node has {n.ints.get('num_heads')} heads and "
                      f"{n.ints.get('kv_num_heads')} KV heads, the manifest says "
                      f"{mo['num_attention_heads']} and {mo['num_key_value_heads']}")
    return GraphFacts(sorted(used), total, list(variant["precisions"]))
