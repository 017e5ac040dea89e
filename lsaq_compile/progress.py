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


def throttled(say, seconds: float = 30.0, clock=time.monotonic):
    """A printer of a sweep's steps (anything with .done and .total) that keeps a short job's log
    short and a long one's alive: the first and last step always, between them one line at
    most every `seconds` (a 7B build's whole-plan pass is half an hour of layers)."""
    last = [None]

    def show(step) -> None:
        now = clock()
        if step.done in (1, step.total) or last[0] is None or now - last[0] >= seconds:
            last[0] = now
            say(str(step))
    return show


def silent(msg: str) -> None:
    pass
