"""Verify a bundle's files before anything runs them: the whole bundle (`lsaq-run verify`,
the compiler's --force guard) or the files of one variant (every launch and switch).

Checks go cheapest first: sizes, then a graph against the manifest and the weight files'
headers (graph_check), and only then the hashes, whose work those checks bound.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import LsaqRuntimeError
from .format import MANIFEST
from .graph_check import check_graph
from .integrity import bundle_path, check_size, hash_settled, verify_files
from .manifest import load_manifest, tokenizer_file, variant_files


def verify_tokenizer(root: Path, manifest: dict) -> None:
    """The tokenizer's size and sha256, before the tokenizer library parses it."""
    verify_files(root, manifest, [tokenizer_file(manifest)])


@dataclass
class VerifiedVariant:
    """One variant's graph on one provider, checked: `data` is the very bytes that were
    checked, which ONNX Runtime is handed (never whatever the file holds by then)."""
    variant: dict
    info: dict      # its manifest provider entry
    graph: Path
    data: bytes


def verify_variant(root: Path, manifest: dict, name: str, provider: str,
                   log=None) -> VerifiedVariant:
    """Verify every file variant `name` uses on `provider` and check its graph against the
    manifest: the graph's hash, then the graph and the weight files' headers and sizes (which
    bound what may be hashed), then the weights' hashes, then the graph again over the headers
    of the hashed files."""
    v = next(x for x in manifest["variants"] if x["name"] == name)
    info = v["providers"][provider]
    files = variant_files(manifest, name, provider)
    graph = bundle_path(root, info["graph"], MANIFEST)
    try:
        data = graph.read_bytes()
    except OSError as e:
        raise LsaqRuntimeError(f"{graph}: cannot be read ({e.strerror})") from None
    entry = next(f for f in manifest["files"] if f["path"] == info["graph"])
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise LsaqRuntimeError(f"{graph}: sha256 mismatch (the file was modified or damaged); "
                               "rebuild or copy the bundle again")
    check_graph(root, manifest, v, provider, data)
    verify_files(root, manifest, files[1:], log=log)
    check_graph(root, manifest, v, provider, data)
    return VerifiedVariant(v, info, graph, data)


def verify_bundle(bundle: str | Path, progress=None, check_graphs: bool = True) -> list[str]:
    """Check every file's place, size and sha256 (no stamps), then every graph against the
    manifest and the weight store; return the problems found.

    Work stays bounded: a weight file is hashed only when a graph that reads it passes the
    cheap checks first (headers, sizes, at most graph_check.HASH_FACTOR times what it reads),
    so a listed file cannot make verify hash without end; such a graph's problems are reported
    instead."""
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
