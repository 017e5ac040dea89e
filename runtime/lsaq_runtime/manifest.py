"""Read and check a bundle's manifest.json: the contract between compiler and runtime.

The runtime owns the format (BUNDLE_FORMAT.md, manifest.schema.json) and the compiler imports
what it needs from here: file names, the schema version, the metric names, the KV and workspace
formulas and the checksum helper, so the two halves cannot drift apart.

The manifest is untrusted input. Reading is bounded (size cap; no NaN or infinities; no integers
longer than 30 digits; nesting depth), the schema bounds every number the planner multiplies,
and cross-field rules tie the numbers together (e.g. `kv_bytes_per_token` must equal what the
model's shape implies, since buffers are allocated from it). Everything here runs before any
graph is opened, so a damaged bundle fails with a message naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from functools import lru_cache
from pathlib import Path

import jsonschema

from .errors import LsaqRuntimeError
from .integrity import bundle_path, check_size, hash_settled, sha256_file

__all__ = ["MANIFEST", "SCHEMA_VERSION", "METRICS", "PRECISIONS", "PARTS", "LINEAR_PART", "TABLES",
           "split_precision", "join_precision", "ELEM_BYTES", "MAX_MANIFEST_BYTES",
           "kv_bytes_per_token", "workspace_bytes", "validate_manifest", "read_manifest_json",
           "load_manifest", "check_files", "verify_bundle", "sha256_file", "tokenizer_file",
           "variant_files", "replace_refusal", "parse_json", "read_manifest_bytes",
           "load_pinned", "manifest_digest", "SWAP_JOURNAL"]

MANIFEST = "manifest.json"
SCHEMA_VERSION = 6
# 5 added per-linear precisions (QKV/O/GATE_UP/DOWN); 6 the embedding table and LM head on the
# ladder (variants[].tables), rank_by kl_fp16 and a float32 residual stream in float16 graphs.
# Each only adds: 4 and 5 read as they are.
MIN_SCHEMA_VERSION = 4
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
METRICS = ("jaccard", "cosine", "zscore", "sensitivity")  # scores.metric: how layers were ranked
PRECISIONS = ("fp16", "int8", "int4")              # per decoder layer, or per part of one
# A layer's precision is one of PRECISIONS when its four stored linears agree; "ATTN/MLP" when
# the attention projections (qkv, o) and the MLP projections (gate_up, down) differ, e.g.
# "int8/int4"; or "QKV/O/GATE_UP/DOWN", one per linear, when neither shorter form says it.
PARTS = ("qkv", "o", "gate_up", "down")             # a layer's stored linears, in that order
LINEAR_PART = {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o",
               "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"}
RANK_BY = ("precision", "kl_fp16", "measured_quality")   # deployment.rank_by
# The token tables: the embedding (read by Gather) and the LM head (a matmul). A tied model has
# one table, used by both, so both get one precision.
TABLES = ("embed_tokens", "lm_head")


def split_precision(p: str) -> dict[str, str]:
    """{part: precision} over PARTS of a layer precision ("int8", "int8/int4" or
    "int8/int8/int4/int8")."""
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


ELEM_BYTES = {"float32": 4, "float16": 2}          # activation / KV dtype of a provider's graph
MAX_MANIFEST_BYTES = 16 << 20
_MAX_INT_DIGITS = 30
# A graph holds no weights (they are external, in .safetensors), only nodes and small constants:
# a few MB even for thousands of layers. It is read into memory whole, so it is bounded.
MAX_GRAPH_BYTES = 1 << 30
# tokenizers parses tokenizer.json whole, into several times its size in memory. The largest in
# use are about 33 MB (Gemma 3's 262k-entry vocabulary); 128 MiB leaves room and bounds that.
MAX_TOKENIZER_BYTES = 128 << 20


def kv_bytes_per_token(model: dict, dtype: str) -> int:
    """Bytes of KV cache per token and sequence: a key and a value row per layer and KV head."""
    return 2 * model["num_layers"] * model["num_key_value_heads"] * model["head_dim"] * ELEM_BYTES[dtype]


# Host memory the loaded tokenizer holds per byte of tokenizer.json: measured 11.4x (181 MiB for
# a 16 MB, 262,144-token BPE; 13.3x at its peak while loading, before any weight is). Small
# vocabularies hide it; a 262k vocabulary's tokenizer outweighs a small model's weights.
TOKENIZER_BYTES_PER_JSON_BYTE = 12


def tokenizer_bytes(m: dict) -> int:
    """Host memory the runtime's tokenizer takes for this bundle (see the factor above)."""
    path = tokenizer_file(m)
    size = next((f["bytes"] for f in m["files"] if f["path"] == path), 0)
    return TOKENIZER_BYTES_PER_JSON_BYTE * size


def workspace_bytes(ws: dict, context: int) -> int:
    """Activation memory of a prefill of `context` tokens (BUNDLE_FORMAT.md)."""
    return int(ws["fixed_bytes"] + ws["per_token_bytes"] * context
               + ws["per_token_sq_bytes"] * context * context)


# ------------------------------------------------------------------------------- JSON
def _bad_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    v = float(text)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{text} overflows a float")
    return v


def parse_json(raw: bytes, where: str) -> object:
    """Strict, bounded JSON: what json.loads accepts minus NaN, Infinity and absurd numbers."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_bad_constant, parse_int=_int,
                          parse_float=_float)
    except UnicodeDecodeError as e:
        raise LsaqRuntimeError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise LsaqRuntimeError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError is a ValueError
        raise LsaqRuntimeError(f"{where}: not valid JSON ({e})") from None


# ------------------------------------------------------------------------------- validation
def _is_int(checker, value) -> bool:
    # Draft 2020-12 counts 30.0 as an integer; the runtime indexes and multiplies with these
    # numbers, so only a JSON integer written as one is.
    return isinstance(value, int) and not isinstance(value, bool)


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    base = jsonschema.Draft202012Validator
    strict = jsonschema.validators.extend(
        base, type_checker=base.TYPE_CHECKER.redefine("integer", _is_int))
    return strict(schema)


def _normal_path(rel: str) -> bool:
    """One spelling per file: no '.' or empty parts, no trailing slash ('./a//b/' is 'a/b')."""
    return all(part not in ("", ".") for part in rel.split("/"))


def _check_version(m: dict, where: str) -> None:
    if not isinstance(m, dict) or m.get("format") != "lsaq-bundle":
        raise LsaqRuntimeError(f"{where}: not an LSAQ bundle manifest (no \"format\": \"lsaq-bundle\")")
    v = m.get("schema_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LsaqRuntimeError(f"{where}: schema_version must be a positive integer, not {v!r}")
    if v > SCHEMA_VERSION:
        raise LsaqRuntimeError(
            f"{where}: bundle written by a newer lsaq-compile (schema_version {v}; this runtime "
            f"reads {SCHEMA_VERSION}); upgrade lsaq")
    if v < MIN_SCHEMA_VERSION:
        raise LsaqRuntimeError(
            f"{where}: bundle written by an older lsaq-compile (schema_version {v}; this runtime "
            f"reads {MIN_SCHEMA_VERSION} to {SCHEMA_VERSION}, which add per-part precisions and "
            "measured quality); "
            "rebuild it with "
            "`lsaq-compile build`")


def validate_manifest(m: dict, where: str = MANIFEST) -> None:
    """Version, JSON Schema, then the cross-field rules a schema cannot express."""
    _check_version(m, where)
    try:
        errors = sorted(_validator().iter_errors(m), key=lambda e: [str(p) for p in e.absolute_path])
    except RecursionError:
        raise LsaqRuntimeError(f"{where}: nested too deeply") from None
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        msg = e.message if len(e.message) <= 200 else e.message[:200] + "..."
        raise LsaqRuntimeError(f"{where}: invalid at {path}: {msg}{more}")

    def bad(msg: str) -> LsaqRuntimeError:
        return LsaqRuntimeError(f"{where}: {msg}; the bundle is damaged, rebuild it")

    mo = m["model"]
    layers = mo["num_layers"]
    if mo["num_attention_heads"] % mo["num_key_value_heads"]:
        raise bad(f"num_attention_heads {mo['num_attention_heads']} is not a multiple of "
                  f"num_key_value_heads {mo['num_key_value_heads']}")
    tok = m["tokenizer"]
    for t in [tok.get("bos_token_id"), *tok["eos_token_ids"]]:
        if t is not None and t >= mo["vocab_size"]:
            raise bad(f"token id {t} is outside the vocabulary of {mo['vocab_size']}")
    listed = {f["path"] for f in m["files"]}
    if len(listed) != len(m["files"]):
        raise bad("a path appears twice in files")
    if MANIFEST in listed:
        raise bad(f"files lists {MANIFEST} itself")
    _check_spellings(m, bad)
    names = set()
    for v in m["variants"]:
        name = v["name"]
        if name in names:
            raise bad(f"variant name {name!r} appears twice")
        names.add(name)
        if len(v["precisions"]) != layers:
            raise bad(f"variant {name!r} lists {len(v['precisions'])} layer precisions but the "
                      f"model has {layers} layers")
        for i, p in enumerate(v["precisions"]):
            try:
                parts = split_precision(p)
            except ValueError as e:
                raise bad(f"variant {name!r}, layer {i}: {e}") from None
            if join_precision(parts) != p:
                raise bad(f"variant {name!r}, layer {i}: write {join_precision(parts)!r}, "
                          f"not {p!r}")
        counts = {p: v["precisions"].count(p) for p in PRECISIONS}
        counts["mixed"] = sum("/" in p for p in v["precisions"])
        if counts != {p: v["layer_counts"].get(p, 0) for p in counts}:
            raise bad(f"variant {name!r}: layer_counts {v['layer_counts']} disagree with its "
                      f"precisions {counts}")
        rank_by = m["deployment"].get("rank_by")
        if rank_by in ("measured_quality", "kl_fp16") and "quality" not in v:
            raise bad(f"variant {name!r} has no measured quality, but deployment.rank_by is "
                      f"{rank_by}")
        if rank_by == "kl_fp16" and "kl_fp16" not in v["quality"]:
            raise bad(f"variant {name!r} has no quality.kl_fp16, but deployment.rank_by is kl_fp16")
        tables = {t: v.get("tables", {}).get(t, "fp16") for t in TABLES}
        if mo.get("tie_word_embeddings") and tables["embed_tokens"] != tables["lm_head"]:
            raise bad(f"variant {name!r}: the model's embedding and LM head are one tied table, "
                      f"but tables gives them {tables['embed_tokens']} and {tables['lm_head']}")
        for prov, info in v["providers"].items():
            if info["graph"] not in info["files"]:
                raise bad(f"variant {name!r} ({prov}): its graph {info['graph']} is not among "
                          "its files")
            _check_graph_entry(m, name, prov, info["graph"], bad)
            missing = [f for f in info["files"] if f not in listed]
            if missing:
                raise bad(f"variant {name!r} ({prov}) uses {missing[0]}, which is not in files")
            if tables["lm_head"] != "fp16" and info["lm_head"] != tables["lm_head"]:
                raise bad(f"variant {name!r} ({prov}): its LM head is stored {tables['lm_head']} "
                          f"but the graph entry says it computes with {info['lm_head']}")
            kv = kv_bytes_per_token(mo, info["dtype"])
            if info["kv_bytes_per_token"] != kv:
                raise bad(f"variant {name!r} ({prov}): kv_bytes_per_token "
                          f"{info['kv_bytes_per_token']} disagrees with the model's shape "
                          f"(2 x {layers} layers x {mo['num_key_value_heads']} KV heads x "
                          f"{mo['head_dim']} x {ELEM_BYTES[info['dtype']]} bytes = {kv})")
    if tokenizer_file(m) not in listed:
        raise bad(f"{tokenizer_file(m)} is not in files; the bundle has no tokenizer")
    tok_bytes = next(f["bytes"] for f in m["files"] if f["path"] == tokenizer_file(m))
    if tok_bytes > MAX_TOKENIZER_BYTES:
        raise LsaqRuntimeError(
            f"{where}: {tokenizer_file(m)} is {tok_bytes:,} bytes, more than the "
            f"{MAX_TOKENIZER_BYTES >> 20} MiB a tokenizer may have (the largest in use are about "
            "33 MB); refused without reading it")


def _check_spellings(m: dict, bad) -> None:
    """Every path in one normal spelling, and no two differing only by case (one file on a
    case-insensitive disk): otherwise one file could be listed, and hashed, thousands of times."""
    seen: dict[str, str] = {}
    for f in m["files"]:
        rel = f["path"]
        if not _normal_path(rel):
            raise bad(f"files lists {rel!r}, which is not written in normal form (no '.', "
                      "empty or trailing parts)")
        other = seen.setdefault(rel.casefold(), rel)
        if other != rel:
            raise bad(f"files lists {other!r} and {rel!r}, one file on a case-insensitive disk")
    if not _normal_path(m["tokenizer"]["dir"].rstrip("/")):
        raise bad(f"tokenizer.dir {m['tokenizer']['dir']!r} is not written in normal form")


def _check_graph_entry(m: dict, name: str, prov: str, graph: str, bad) -> None:
    """A graph sits at the bundle root: ONNX Runtime resolves its external data from the
    graph's folder, the checks from the root, and they must read the same files. It is read into
    memory whole, so its size is bounded."""
    if "/" in graph:
        raise bad(f"variant {name!r} ({prov}): its graph {graph!r} is in a subfolder; graphs "
                  "sit at the bundle root (ONNX Runtime reads their weights relative to them)")
    size = next((f["bytes"] for f in m["files"] if f["path"] == graph), 0)
    if size > MAX_GRAPH_BYTES:
        raise bad(f"variant {name!r} ({prov}): its graph {graph} is {size:,} bytes, more than "
                  f"the {MAX_GRAPH_BYTES >> 20} MiB a graph without weights may have")


def tokenizer_file(m: dict) -> str:
    return f"{m['tokenizer']['dir'].rstrip('/')}/tokenizer.json"


def variant_files(m: dict, name: str, provider: str) -> list[str]:
    """Every file the variant's graph on `provider` uses: the graph first, then weights."""
    v = next(x for x in m["variants"] if x["name"] == name)
    info = v["providers"][provider]
    return [info["graph"]] + [f for f in info["files"] if f != info["graph"]]


# ------------------------------------------------------------------------------- reading
def read_manifest_json(bundle: str | Path) -> dict:
    return parse_json(read_manifest_bytes(bundle), str(Path(bundle) / MANIFEST))


# Written by `lsaq-compile build --force` beside the target while it swaps the old bundle for the
# new one (lsaq_compile.bundle); its presence means a build was interrupted mid-swap.
SWAP_JOURNAL = ".{name}.lsaq-swap"


def _missing_bundle(root: Path) -> str:
    journal = root.parent / SWAP_JOURNAL.format(name=root.name)
    if journal.is_file():
        return (f"{root}: no such bundle folder: an `lsaq-compile build --force` into it was "
                f"interrupted while swapping folders ({journal} says which); run the same build "
                "again, which finishes or undoes the swap before it starts")
    return f"{root}: no such bundle folder"


def read_manifest_bytes(bundle: str | Path) -> bytes:
    """The raw bytes of a bundle's manifest.json (a regular file, at most 16 MiB)."""
    root = Path(bundle)
    if not root.is_dir():
        raise LsaqRuntimeError(_missing_bundle(root))
    path = root / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise LsaqRuntimeError(f"{path}: missing; {root} is not a complete LSAQ bundle "
                               "(built by `lsaq-compile build`)") from None
    except OSError as e:
        raise LsaqRuntimeError(f"{path}: cannot be read ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise LsaqRuntimeError(f"{path}: not a regular file (a link or a folder); refused")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise LsaqRuntimeError(f"{path}: {st.st_size:,} bytes, more than the "
                               f"{MAX_MANIFEST_BYTES >> 20} MiB a manifest may have; refused")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise LsaqRuntimeError(f"{path}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise LsaqRuntimeError(f"{path}: more than {MAX_MANIFEST_BYTES >> 20} MiB; refused")
    return raw


def load_pinned(bundle: str | Path) -> tuple[dict, str]:
    """(checked manifest, sha256 of its bytes): what a long-running server holds on to, to
    tell later whether the folder still holds the bundle it launched with."""
    root = Path(bundle)
    raw = read_manifest_bytes(root)
    m = parse_json(raw, str(root / MANIFEST))
    validate_manifest(m, str(root / MANIFEST))
    check_files(root, m)
    return m, hashlib.sha256(raw).hexdigest()


def manifest_digest(bundle: str | Path) -> str:
    """sha256 of the bundle's manifest.json bytes as they are now."""
    return hashlib.sha256(read_manifest_bytes(bundle)).hexdigest()


def check_files(bundle: str | Path, m: dict) -> None:
    """Every listed file is inside the bundle (no links), exists, and has its listed size."""
    root = Path(bundle)
    for f in m["files"]:
        p = bundle_path(root, f["path"], MANIFEST)
        what = "the tokenizer is missing" if f["path"] == tokenizer_file(m) else "missing"
        check_size(p, f["bytes"], what)


def load_manifest(bundle: str | Path, check_sizes: bool = True) -> dict:
    """The checked manifest of the bundle folder `bundle` (sizes of every file included)."""
    root = Path(bundle)
    m = read_manifest_json(root)
    validate_manifest(m, str(root / MANIFEST))
    if check_sizes:
        check_files(root, m)
    return m


def verify_bundle(bundle: str | Path, progress=None, check_graphs: bool = True) -> list[str]:
    """Check every file's place, size and sha256 (no stamps), then every graph against the
    manifest and the weight store; return the problems found.

    Work stays bounded: a weight file is hashed only when a graph that reads it passes the
    cheap checks first (headers, sizes, at most graph_check.HASH_FACTOR times what it reads),
    so a listed file cannot make verify hash without end; such a graph's problems are reported
    instead."""
    from .graph_check import check_graph

    root = Path(bundle)
    m = load_manifest(root, check_sizes=False)
    problems, sized = [], []
    for f in m["files"]:
        try:
            p = bundle_path(root, f["path"], MANIFEST)
            check_size(p, f["bytes"])
            sized.append((f, p))
        except LsaqRuntimeError as e:
            problems.append(str(e))
    graph_problems: list[str] = []
    weights: dict[str, bool] = {}   # weight file -> some graph reading it passed the cheap checks
    if check_graphs:
        for v in m["variants"]:
            for prov, info in v["providers"].items():
                try:
                    check_graph(root, m, v, prov, _graph_bytes(root, info["graph"]))
                    passed = True
                except LsaqRuntimeError as e:
                    graph_problems.append(str(e))
                    passed = False
                for w in info["files"]:
                    if w != info["graph"]:
                        weights[w] = weights.get(w, False) or passed
    for f, p in sized:
        if weights.get(f["path"]) is False:
            continue   # no graph that reads it passed: hashing it could be unbounded
        if progress:
            progress(f["path"])
        try:
            if hash_settled(p)[0] != f["sha256"]:
                problems.append(f"{p}: sha256 mismatch")
        except LsaqRuntimeError as e:
            problems.append(str(e))
    if problems:  # graphs over damaged files would only repeat them
        return problems
    return graph_problems


def _graph_bytes(root: Path, rel: str) -> bytes:
    p = bundle_path(root, rel, MANIFEST)
    try:
        return p.read_bytes()
    except OSError as e:
        raise LsaqRuntimeError(f"{p}: cannot be read ({e.strerror})") from None


def replace_refusal(folder: str | Path) -> str | None:
    """Why `folder` must not be deleted to make room for a new bundle, or None when it may be:
    it passes the runtime's full check (`verify_bundle`: schema, every listed file's place, size
    and sha256) and holds nothing but its listed files. Whatever else it is (a user's folder
    with a manifest.json that merely says "lsaq-bundle", a damaged bundle), it stays."""
    root = Path(folder)
    if root.is_symlink() or not root.is_dir():
        return f"{root} is not a folder"
    path = root / MANIFEST
    if path.is_symlink() or not path.is_file():
        return f"{root} is not an LSAQ bundle (it has no {MANIFEST})"
    try:
        m = read_manifest_json(root)
    except LsaqRuntimeError as e:
        return f"{root} is not recognisably an LSAQ bundle ({e})"
    if not isinstance(m, dict) or m.get("format") != "lsaq-bundle":
        return f"{root} is not an LSAQ bundle ({MANIFEST} does not say \"format\": \"lsaq-bundle\")"
    try:
        validate_manifest(m, str(path))
    except LsaqRuntimeError as e:
        return f"{root} does not pass the bundle check, so it may hold someone's files ({e})"
    listed = {f["path"] for f in m["files"]}
    extra = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or (not p.is_dir() and rel != MANIFEST and rel not in listed):
            extra.append(rel)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"{root} holds files that are not part of the bundle ({shown})"
    problems = verify_bundle(root)
    if problems:
        return (f"{root} does not pass the bundle check, so it may hold someone's files "
                f"({problems[0]}{f' and {len(problems) - 1} more' if len(problems) > 1 else ''})")
    return None
