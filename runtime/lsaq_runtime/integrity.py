"""Files of a bundle: confinement, sizes, checksums (with a verified-stamp cache), safetensors headers.

Every path the runtime opens comes from the manifest and goes through `bundle_path`, which
refuses absolute paths, `..`, symlinks anywhere below the bundle folder, and anything that
resolves outside it. Checksums: `verify_files` hashes every file a variant uses before ONNX
Runtime opens it. Hashing is ~1 GB/s here, so for large bundles a stamp remembers a file that
hashed correctly, keyed by device, inode, size, mtime and ctime (ctime cannot be set back by a
user program), in the user's cache folder; any change to the file invalidates it. `lsaq-run
verify` ignores stamps and hashes everything.

A stamp records only what was hashed: the file is hashed through one open descriptor, and its
identity (device, inode, size, mtime, ctime) before and after hashing must equal the identity
the path has afterwards. A file renamed over the path, or written to, while it was being hashed
fails that test: it is hashed again (what the path now holds), never stamped with the old bytes.
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


def sha256_files(paths, workers: int | None = None) -> list[str]:
    """sha256_file of each path, in order, several files at once: hashlib lets go of the GIL,
    so a model's or a bundle's files hash in about the time of the largest one (a 7B model's
    13 GB took half a minute one file after another)."""
    return _each_file(sha256_file, paths, workers)


def _each_file(fn, paths, workers: int | None = None) -> list:
    """fn(path) of each path, in order, on several threads, the largest files first; the
    first path's error (in the given order) is raised."""
    from concurrent.futures import ThreadPoolExecutor

    from .probe import usable_cpus

    paths = list(paths)
    workers = min(len(paths), workers or usable_cpus())
    if workers <= 1:
        return [fn(p) for p in paths]
    order = sorted(range(len(paths)), key=lambda i: -_size(paths[i]))
    with ThreadPoolExecutor(workers, thread_name_prefix="lsaq-sha256") as ex:
        done = {i: ex.submit(fn, paths[i]) for i in order}   # run in submission order
    return [done[i].result() for i in range(len(paths))]


def _size(path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:      # fn reports it, in the caller's order
        return 0


class FileChanged(Exception):
    """The file at a path changed or was replaced while it was being hashed."""


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def hash_exactly(path: str | os.PathLike, chunk: int = 1 << 22) -> tuple[str, os.stat_result]:
    """(sha256, stat) of the file the path names, read through one descriptor; FileChanged when
    the descriptor's identity moved during the read or the path now names something else, so
    the digest describes the path's bytes at the moment of return. Opened without following a
    final symlink and without blocking (a FIFO swapped in must not hang the launch)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise FileChanged(f"{path} is no longer a regular file")
        h = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            buf = bytearray(chunk)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
        after = os.fstat(fd)
    finally:
        os.close(fd)
    now = os.stat(path, follow_symlinks=False)
    if not _identity(before) == _identity(after) == _identity(now):
        raise FileChanged(f"{path} changed while it was being hashed")
    return h.hexdigest(), after


def hash_settled(path: Path, tries: int = 3) -> tuple[str, os.stat_result]:
    """hash_exactly, retried when the file changed under it (a copy still finishing); one clear
    error when it keeps changing."""
    for _ in range(tries):
        try:
            return hash_exactly(path)
        except FileChanged:
            continue
        except OSError as e:
            raise LsaqRuntimeError(f"{path}: cannot be read ({e.strerror})") from None
    raise LsaqRuntimeError(f"{path}: kept changing while it was being checked ({tries} tries); "
                           "something is writing the bundle: wait for it to finish, then retry")


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


def _stamp_key(path: Path, sha: str, st: os.stat_result | None = None) -> tuple[str, str] | None:
    if st is None:
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


def _write_stamp(path: Path, sha: str, st: os.stat_result) -> None:
    """Remember that the file whose identity is `st` (the stat of the hashed descriptor) has
    this sha256."""
    k = _stamp_key(path, sha, st)
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
    todo = []
    for rel in rels:
        e = entries.get(rel)
        if e is None:
            raise LsaqRuntimeError(f"{rel} is used by the variant but not listed in manifest.json "
                                   "files; the bundle is damaged or hostile, rebuild it")
        p = bundle_path(root, rel, "manifest.json")
        check_size(p, e["bytes"])
        if _has_stamp(p, e["sha256"]):
            stamped += e["bytes"]
        else:
            todo.append((p, e))
    # the files at once (a 7B bundle's stores in the time of the largest, not their sum)
    for (p, e), (sha, st) in zip(todo, _each_file(hash_settled, [p for p, _ in todo])):
        if sha != e["sha256"] or st.st_size != e["bytes"]:
            raise LsaqRuntimeError(f"{p}: sha256 mismatch (the file was modified or damaged); "
                                   "rebuild or copy the bundle again")
        hashed += e["bytes"]
        _write_stamp(p, sha, st)
    if log:
        log(f"verified {len(rels)} weight files ({hashed / 2**20:,.0f} MiB hashed, "
            f"{stamped / 2**20:,.0f} MiB unchanged since an earlier check)")
    return {"hashed": hashed, "stamped": stamped}


# ------------------------------------------------------------------------------- safetensors
# Bytes per element of the safetensors dtypes; an entry's length must be its shape's product times this.
ST_ELEM = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
           "U8": 1, "BOOL": 1}


def safetensors_index(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """name -> (dtype, shape, absolute offset, length) from a .safetensors header (see
    safetensors_layout)."""
    return safetensors_layout(path)[0]


def safetensors_layout(path: Path) -> tuple[dict[str, tuple[str, list[int], int, int]], int]:
    """(name -> (dtype, shape, absolute offset, length), header bytes) of a .safetensors file,
    checked as the format requires: the header fits the file, every entry's length is its
    shape times its dtype's size, and the entries tile the data section exactly (no overlap, no
    hole, nothing after the last one), so every byte of the file is either header or a tensor
    the header names. That ties the file's size to what its header declares, cheaply, before
    anything is hashed."""
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
            dtype, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a <= b <= data_len
                    and isinstance(shape, list) and len(shape) <= 8
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                            for d in shape)):
                raise ValueError
        except (TypeError, ValueError, KeyError):
            raise LsaqRuntimeError(f"{path}: bad safetensors entry for {name!r}") from None
        count = 1
        for d in shape:
            count *= d
        if dtype not in ST_ELEM or count * ST_ELEM[dtype] != b - a:
            raise LsaqRuntimeError(f"{path}: safetensors entry {name!r} is {b - a} bytes, not "
                                   f"those of a {dtype} {shape} tensor; the weight store is damaged")
        out[name] = (str(dtype), list(shape), data_start + a, b - a)
        spans.append((a, b))
    spans.sort()
    if any(b1 > a2 for (_, b1), (a2, _) in zip(spans, spans[1:])):
        raise LsaqRuntimeError(f"{path}: safetensors entries overlap; the weight store is damaged")
    covered = sum(b - a for a, b in spans)
    if covered != data_len:
        raise LsaqRuntimeError(f"{path}: {data_len - covered:,} of its {data_len:,} data bytes "
                               "belong to no tensor its header names; the weight store is "
                               "damaged or padded, rebuild it")
    return out, data_start
