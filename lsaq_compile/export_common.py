"""What every exporter shares: where an export may be written and how it is put in place.

An export is written under a temporary name beside its target and renamed when complete, so a
file or folder at the target path is always a whole export. An existing target is replaced only
with --force, and only when it is recognisably an export this tool wrote (a GGUF whose metadata
says so, a folder holding nothing but the files its marker lists): never a user's own file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import LsaqError

TMP_MARK = ".lsaq-export-tmp-"
FOLDER_MARKER = "lsaq_export.json"       # in an exported folder: what wrote it, and its files
GGUF_MARKER_KEY = "lsaq.export"          # GGUF metadata key holding the same record
MODELFILE_HEAD = "# Ollama Modelfile written by lsaq-compile export"


def tmp_path(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def clean_stale(out: Path) -> None:
    """Remove temporaries of earlier exports to this target whose process is gone."""
    from .folders import _pid_alive

    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def check_parent(out: Path) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LsaqError(f"{parent}: no such folder for -o {out}; create it first")
    if not os.access(parent, os.W_OK):
        raise LsaqError(f"{parent}: not writable, so -o {out} cannot be written")


def gguf_refusal(path: Path) -> str | None:
    """Why an existing file must not be replaced by a GGUF export (None: it may be)."""
    if path.is_symlink() or not path.is_file():
        return f"{path} is not a regular file"
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
    except Exception:  # not a GGUF at all (gguf raises several error types)
        return f"{path} is not a GGUF file written by lsaq-compile export"
    if GGUF_MARKER_KEY not in fields:
        return f"{path} is a GGUF file that lsaq-compile export did not write"
    return None


def modelfile_refusal(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return f"{path} is not a regular file"
    try:
        with open(path, encoding="utf-8") as f:
            head = f.readline().rstrip("\n")
    except (OSError, UnicodeDecodeError):
        head = ""
    return None if head == MODELFILE_HEAD else f"{path} is not a Modelfile written by lsaq-compile export"


def folder_refusal(path: Path) -> str | None:
    """A folder may be replaced when its marker lists every file it holds."""
    if path.is_symlink() or not path.is_dir():
        return f"{path} is not a folder"
    marker = path / FOLDER_MARKER
    try:
        rec = json.loads(marker.read_text(encoding="utf-8"))
        listed = set(rec["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{path} is not a folder written by lsaq-compile export (no readable {FOLDER_MARKER})"
    extra = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink() or (p.is_file() and rel != FOLDER_MARKER and rel not in listed) or \
                (not p.is_file() and not p.is_dir()):
            extra.append(rel)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"{path} holds files that the export did not write ({shown})"
    return None


def check_target(out: Path, force: bool, refusal) -> None:
    """Refuse an existing target unless --force and `refusal(out)` finds it is our export."""
    from .folders import check_target as check

    check(out, force, refusal, "an earlier export")


def put_in_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary over `out` (a folder: the old one is moved aside first)."""
    if tmp.is_dir() and (out.exists() or out.is_symlink()):
        trash = out.parent / f".{out.name}.lsaq-old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_record(reader, variant: str, target: str) -> dict:
    """What the exported artifact says about where it came from."""
    from . import __version__

    m = reader.manifest
    return {"format": "lsaq-export", "target": target, "exported_by": f"lsaq-compile {__version__}",
            "variant": variant, "model": m["model"]["name"],
            "architecture": m["model"]["architecture"],
            "bundle_manifest_created_by": m.get("created_by")}
