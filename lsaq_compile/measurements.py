"""Finished measurements, kept for every later build of the same model: exllamav2's
"measure once, quantize to any size", made automatic.

A measurement (the scoring stage's output) depends on the model's files, the metric and its
settings, the calibration windows and, for measured sensitivity, the quantizers whose error it
measures. It does not depend on the ladder's rungs, the providers, the deployment or the
kernels' settings, so a second build of the same model at other sizes, or with other graphs,
takes the first build's measurement instead of repeating an hour of work; it says so in one
line, and `build --remeasure` measures again.

Entries are `<key>.json` under `$LSAQ_CACHE_DIR/measurements/` (default
`~/.cache/lsaq/measurements/`; the runtime's verified-file stamps share the folder), written
whole or not at all, and only once a measurement is complete: a killed measurement lives on
in the build's own job record (`build --resume`), never here. An entry that cannot be read is
ignored and measured again, never trusted in part.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from lsaq_runtime.integrity import _cache_dir

from .job import fingerprint, write_json_atomic

VERSION = 1      # raise when what a measurement means changes: older entries stop matching


def folder() -> Path:
    return _cache_dir() / "measurements"


def key(ctx, windows_sha256: str | None) -> str:
    """What decides the numbers of this build's measurement, fingerprinted."""
    sc = dataclasses.asdict(ctx.profile.scoring)
    sc.pop("calibration", None)          # the text is represented by its windows
    measured = ctx.metric == "sensitivity"
    from .devices import device_type

    return fingerprint({"version": VERSION, "model": ctx.source.fingerprint(), "metric": ctx.metric,
                        "scoring": sc, "windows": windows_sha256,
                        # float16 on a GPU measures other numbers than float32 on a CPU
                        "device": (device_type(ctx.device), ctx.dtype) if measured else None,
                        "quantizers": dataclasses.asdict(ctx.settings) if measured else None,
                        "tables": ctx.profile.tables_on_ladder if measured else None})


def lookup(k: str, say=None):
    """(Scores, facts of the entry) stored under `k`, or None."""
    from .importance import Scores

    path = folder() / f"{k}.json"
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if rec.get("key") != k:
            raise ValueError("stored under another key")
        return Scores.from_json(rec["scores"]), rec.get("facts", {})
    except Exception as e:   # noqa: BLE001 - any damage means: measure again
        if say:
            say(f"scoring: ignoring the unreadable stored measurement {path} ({e}); measuring again")
        return None


def store(k: str, scores, facts: dict) -> Path | None:
    """Keep a finished measurement; a cache that cannot be written costs only the reuse."""
    path = folder() / f"{k}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": k, "facts": {**facts, "stored": time.strftime(
            "%Y-%m-%d %H:%M:%S")}, "scores": scores.to_json()})
    except OSError:
        return None
    return path
