"""Read and check a bundle's manifest.json: version, schema, file sizes, checksums.

Everything here runs before any graph is loaded, so a damaged bundle fails with a message that
names the file and the problem instead of an ONNX Runtime error halfway through loading.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import jsonschema

from .errors import LsaqRuntimeError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


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


def validate_manifest(m: dict, where: str = MANIFEST) -> None:
    """Version, JSON Schema, then the cross-field rules a schema cannot express."""
    _check_version(m, where)
    errors = sorted(_validator().iter_errors(m), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise LsaqRuntimeError(f"{where}: invalid at {path}: {e.message}{more}")

    layers = m["model"]["num_layers"]
    listed = {f["path"] for f in m["files"]}
    if len(listed) != len(m["files"]):
        raise LsaqRuntimeError(f"{where}: a path appears twice in files")
    names = set()
    for v in m["variants"]:
        name = v["name"]
        if name in names:
            raise LsaqRuntimeError(f"{where}: variant name {name!r} appears twice")
        names.add(name)
        if len(v["precisions"]) != layers:
            raise LsaqRuntimeError(f"{where}: variant {name!r} lists {len(v['precisions'])} layer "
                                   f"precisions but the model has {layers} layers")
        counts = {p: v["precisions"].count(p) for p in ("fp16", "int8", "int4")}
        if counts != {p: v["layer_counts"][p] for p in counts}:
            raise LsaqRuntimeError(f"{where}: variant {name!r}: layer_counts {v['layer_counts']} "
                                   f"disagree with its precisions {counts}")
        for prov, info in v["providers"].items():
            if info["graph"] not in listed:
                raise LsaqRuntimeError(f"{where}: variant {name!r} ({prov}) uses graph "
                                       f"{info['graph']} which is not in files")
    tok = tokenizer_file(m)
    if tok not in listed:
        raise LsaqRuntimeError(f"{where}: {tok} is not in files; the bundle has no tokenizer")


def tokenizer_file(m: dict) -> str:
    return f"{m['tokenizer']['dir'].rstrip('/')}/tokenizer.json"


def read_manifest_json(bundle: str | Path) -> dict:
    root = Path(bundle)
    if not root.is_dir():
        raise LsaqRuntimeError(f"{root}: no such bundle folder")
    path = root / MANIFEST
    if not path.is_file():
        raise LsaqRuntimeError(f"{path}: missing; {root} is not a complete LSAQ bundle "
                               "(built by `lsaq-compile build`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LsaqRuntimeError(f"{path}: not valid JSON ({e})") from None


def check_files(bundle: str | Path, m: dict) -> None:
    """Every listed file exists with its listed size (cheap: no hashing)."""
    root = Path(bundle)
    for f in m["files"]:
        p = root / f["path"]
        if not p.is_file():
            what = "the tokenizer is missing" if f["path"] == tokenizer_file(m) else "missing"
            raise LsaqRuntimeError(f"{p}: {what} (listed in {MANIFEST}); the bundle is incomplete, "
                                   "rebuild or copy it again")
        size = p.stat().st_size
        if size != f["bytes"]:
            kind = "truncated" if size < f["bytes"] else "longer than listed"
            raise LsaqRuntimeError(f"{p}: {kind}: {size} bytes, the manifest lists {f['bytes']}; "
                                   "the bundle is damaged, rebuild or copy it again")


def load_manifest(bundle: str | Path, check_sizes: bool = True) -> dict:
    """The checked manifest of the bundle folder `bundle` (sizes of every file included)."""
    root = Path(bundle)
    m = read_manifest_json(root)
    validate_manifest(m, str(root / MANIFEST))
    if check_sizes:
        check_files(root, m)
    return m


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(m: dict, rel: str) -> dict:
    for f in m["files"]:
        if f["path"] == rel:
            return f
    raise LsaqRuntimeError(f"{rel} is not listed in {MANIFEST}")


def verify_file(bundle: str | Path, m: dict, rel: str) -> None:
    """Raise if the file's sha256 differs from the manifest's."""
    entry = file_entry(m, rel)
    p = Path(bundle) / rel
    if sha256_file(p) != entry["sha256"]:
        raise LsaqRuntimeError(f"{p}: sha256 mismatch (the file was modified or damaged); "
                               "rebuild or copy the bundle again")


def verify_bundle(bundle: str | Path, progress=None) -> list[str]:
    """Check every file's size and sha256; return the problems found (empty = intact)."""
    root = Path(bundle)
    m = load_manifest(root, check_sizes=False)
    problems = []
    for f in m["files"]:
        p = root / f["path"]
        if progress:
            progress(f["path"])
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != f["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, the manifest lists {f['bytes']}")
        elif sha256_file(p) != f["sha256"]:
            problems.append(f"{p}: sha256 mismatch")
    return problems
