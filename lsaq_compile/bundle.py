"""The compiler's public entry points for bundles: build one (build.py runs the stages),
score as a build would, read one back. Kept as the module callers import them from."""

from __future__ import annotations

import os

from .build import build_bundle, score_for_profile
from .folders import check_replaceable

__all__ = ["build_bundle", "score_for_profile", "read_manifest", "check_replaceable"]


def read_manifest(bundle: str | os.PathLike) -> dict:
    """The manifest of an existing bundle, checked by the runtime's reader (sizes included)."""
    from lsaq_runtime.manifest import load_manifest

    return load_manifest(bundle)
