"""For children a test kills hard (SIGKILL): nothing of theirs may outlive the test run."""

from __future__ import annotations

import os
from pathlib import Path


def private_tmp_env(tmp_path: Path) -> dict:
    """The environment with TMPDIR under tmp_path (which pytest removes): a killed build cannot
    remove its temporaries (the converted tokenizer), and each run left them in /tmp."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}
