"""Files of a bundle: confinement, sizes, checksums (with a verified-stamp cache), safetensors headers.

Every path the runtime opens comes from the manifest and goes through `bundle_path`, which
refuses absolute paths, `..`, symlinks anywhere below the bundle folder, and anything that
resolves outside it. Checksums: `verify_files` hashes every file a variant uses before ONNX
Runtime opens it. Hashing is ~1 GB/s here, so for large bundles a stamp remembers a file that
hashed correctly, keyed by device, inode, size, mtime and ctime (ctime cannot be set back by a
user program), in the user's cache folder; any change to the file invalidates it. `lsaq-run
verify` ignores stamps and hashes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path, PurePosixPath

from .errors import LsaqRuntimeError

CACHE_ENV = "LSAQ_CACHE_DIR"          # where stamps live; default $XDG_CACHE_HOME/lsaq
NO_STAMPS_ENV = "LSAQ_VERIFY_ALWAYS"  # set to 1: hash every launch, ignore stamps
MAX_SAFETENSORS_HEADER = 64 << 20


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_relpath(rel: str, where: str) -> PurePosixPath:
    """A manifest or graph path: relative, forward slashes, no '..', no drive, no controls."""
    if not isinstance(rel, str) or not rel:
        raise LsaqRuntimeError(f"{where}: an empty path")
    p = PurePosixPath(rel)
    if (p.is_absolute() or "\\" in rel or ":" in rel or ".." in p.parts
            or any(ord(c) < 32 or ord(c) == 127 for c in rel)):
        raise LsaqRuntimeError(f"{where}: path {rel!r} is not a plain relative path inside the "
                               "bundle; the bundle is damaged or hostile, rebuild it")
    return p


def bundle_path(root: Path, rel: str, where: str) -> Path:
    """root/rel, after checking it stays inside root and no part of it below root is a symlink."""
    p = check_relpath(rel, where)
    cur = Path(root)
    for part in p.parts:
        cur = cur / part
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return Path(root) / p  # missing: the caller reports it
        except OSError as e:
            raise LsaqRuntimeError(f"{cur}: cannot be read ({e.strerror})") from None
        if stat.S_ISLNK(st.st_mode):
            raise LsaqRuntimeError(f"{cur}: is a symbolic link; a bundle holds its own files "
                                   "(links could point outside it), copy the bundle with its "
                                   "files instead of links")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(cur)]) != real_root:
        raise LsaqRuntimeError(f"{cur}: resolves outside the bundle folder; refused")
    return cur


def check_size(path: Path, expected: int, what: str = "") -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise LsaqRuntimeError(f"{path}: {what or 'missing'} (listed in manifest.json); the bundle "
                               "is incomplete, rebuild or copy it again") from None
    if not stat.S_ISREG(st.st_mode):
        raise LsaqRuntimeError(f"{path}: not a regular file; the bundle is damaged")
    if st.st_size != expected:
        kind = "truncated" if st.st_size < expected else "longer than listed"
        raise LsaqRuntimeError(f"{path}: {kind}: {st.st_size} bytes, the manifest lists {expected}; "
                               "the bundle is damaged, rebuild or copy it again")


# ------------------------------------------------------------------------------- stamps
def _cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "lsaq"


def _stamp_key(path: Path, sha: str) -> tuple[str, str] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    ident = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|" \
            f"{st.st_mtime_ns}|{st.st_ctime_ns}|{sha}"
    return hashlib.sha256(ident.encode()).hexdigest(), ident


def _stamp_file(key: str) -> Path:
    return _cache_dir() / "verified" / key[:2] / key


def _has_stamp(path: Path, sha: str) -> bool:
    if os.environ.get(NO_STAMPS_ENV):
        return False
    k = _stamp_key(path, sha)
    if k is None:
        return False
    try:
        return _stamp_file(k[0]).read_text(encoding="utf-8") == k[1]
    except (OSError, UnicodeDecodeError):
        return False


def _write_stamp(path: Path, sha: str) -> None:
    k = _stamp_key(path, sha)
    if k is None:
        return
    f = _stamp_file(k[0])
    try:  # a cache: failing to write one only costs a re-hash next time
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        tmp.write_text(k[1], encoding="utf-8")
        os.replace(tmp, f)
    except OSError:
        pass


def verify_files(root: Path, manifest: dict, rels: list[str], log=None) -> dict[str, int]:
    """Size and sha256 of each listed file (stamped files skip the hash). Returns how many bytes
    were hashed and how many were trusted from a stamp."""
    entries = {f["path"]: f for f in manifest["files"]}
    hashed = stamped = 0
    for rel in rels:
        e = entries.get(rel)
        if e is None:
            raise LsaqRuntimeError(f"{rel} is used by the variant but not listed in manifest.json "
                                   "files; the bundle is damaged or hostile, rebuild it")
        p = bundle_path(root, rel, "manifest.json")
        check_size(p, e["bytes"])
        if _has_stamp(p, e["sha256"]):
            stamped += e["bytes"]
            continue
        if sha256_file(p) != e["sha256"]:
            raise LsaqRuntimeError(f"{p}: sha256 mismatch (the file was modified or damaged); "
                                   "rebuild or copy the bundle again")
        hashed += e["bytes"]
        _write_stamp(p, e["sha256"])
    if log:
        log(f"verified {len(rels)} weight files ({hashed / 2**20:,.0f} MiB hashed, "
            f"{stamped / 2**20:,.0f} MiB unchanged since an earlier check)")
    return {"hashed": hashed, "stamped": stamped}


# ------------------------------------------------------------------------------- safetensors
def safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, absolute offset, length) from a .safetensors header, checked: the
    header fits the file, every range lies in the data section, and ranges do not overlap."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LsaqRuntimeError(f"{path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise LsaqRuntimeError(f"{path}: safetensors header length {n} does not fit the "
                                       "file; the weight store is damaged")
            raw = f.read(n)
    except OSError as e:
        raise LsaqRuntimeError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise LsaqRuntimeError(f"{path}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise LsaqRuntimeError(f"{path}: the safetensors header is not a JSON object")
    data_start, data_len = 8 + n, size - 8 - n
    out, spans = {}, []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = e["dtype"], [int(d) for d in e["shape"]], e["data_offsets"]
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= data_len):
                raise ValueError
        except (TypeError, ValueError, KeyError):
            raise LsaqRuntimeError(f"{path}: bad safetensors entry for {name!r}") from None
        out[name] = (str(dtype), shape, data_start + a, b - a)
        spans.append((a, b))
    spans.sort()
    if any(b1 > a2 for (_, b1), (a2, _) in zip(spans, spans[1:])):
        raise LsaqRuntimeError(f"{path}: safetensors entries overlap; the weight store is damaged")
    return out
