"""Progress lines on stderr, prefixed with the stage and the elapsed time."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {msg}", file=self.stream, flush=True)

    def stage(self, name: str):
        """A callable that prefixes messages with a stage name (scoring, quantizing, ...)."""
        return lambda msg: self(f"{name}: {msg}")


def silent(msg: str) -> None:
    pass
