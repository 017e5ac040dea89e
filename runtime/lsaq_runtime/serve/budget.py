"""A memory budget that an orchestrator changes while the server runs: read from a file at
every probe (the CLI's --memory-budget-file), parsed into bytes here, at the edge."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import LsaqRuntimeError
from ..sizes import parse_size
from .policy import describe_bytes


class FileBudget:
    """A memory budget read from a file at every probe: '300MB', '6GiB', a byte count, or
    'none' (no cap). An orchestrator (or a test) rewrites the file to squeeze or free the
    server, best atomically (write another file, rename it over this one). A file that cannot
    be read, or is empty (caught mid-rewrite), keeps the last good value (said once)."""

    def __init__(self, path, log: Callable[[str], None] | None = None):
        self.path, self.log, self._said = Path(path), log, None
        self.value = self._read()   # at launch a bad file is an error

    MAX_BYTES = 4096   # a size is a few characters; more is not a budget file

    def _read(self) -> int | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(self.MAX_BYTES + 1)
        except OSError as e:
            raise LsaqRuntimeError(f"{self.path}: cannot read the memory budget file "
                                   f"({e.strerror}); write a size such as 6GiB into it") from None
        try:
            if len(raw) > self.MAX_BYTES or b"\0" in raw:
                raise ValueError
            text = raw.decode("utf-8").strip()
        except ValueError:  # UnicodeDecodeError is one
            raise LsaqRuntimeError(f"{self.path}: the memory budget file is not a short text "
                                   "file; write a size such as 6GiB, or none") from None
        if not text:
            raise LsaqRuntimeError(f"{self.path}: the memory budget file is empty; write a "
                                   "size such as 6GiB, or none")
        if text.lower() == "none":
            return None
        try:
            return parse_size(text)
        except LsaqRuntimeError as e:
            raise LsaqRuntimeError(f"{self.path}: {e}") from None

    def __call__(self) -> int | None:
        try:
            self.value, self._said = self._read(), None
        except LsaqRuntimeError as e:
            if self.log and str(e) != self._said:
                self.log(f"{e}; keeping the budget {describe_bytes(self.value)}")
            self._said = str(e)
        return self.value
