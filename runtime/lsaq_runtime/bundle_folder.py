"""May a folder be replaced by a new bundle? The guard `lsaq-compile build --force` asks before
it deletes anything: only a folder that is, verifiably, an LSAQ bundle and nothing more."""

from __future__ import annotations

from pathlib import Path

from .errors import LsaqRuntimeError
from .format import EVALUATIONS, FORMAT_NAME, MANIFEST
from .manifest import read_manifest_json, validate_manifest
from .verify import verify_bundle


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
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        return f"{root} is not an LSAQ bundle ({MANIFEST} does not say \"format\": \"{FORMAT_NAME}\")"
    try:
        validate_manifest(m, str(path))
    except LsaqRuntimeError as e:
        return f"{root} does not pass the bundle check, so it may hold someone's files ({e})"
    listed = {f["path"] for f in m["files"]}
    extra = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink() or (not p.is_dir() and rel not in (MANIFEST, EVALUATIONS)
                              and rel not in listed):
            extra.append(rel)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"{root} holds files that are not part of the bundle ({shown})"
    problems = verify_bundle(root)
    if problems:
        return (f"{root} does not pass the bundle check, so it may hold someone's files "
                f"({problems[0]}{f' and {len(problems) - 1} more' if len(problems) > 1 else ''})")
    return None
