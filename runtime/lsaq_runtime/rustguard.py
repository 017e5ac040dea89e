"""Calls into the `tokenizers` library (Rust) that end as one clear error, whatever the input.

A bundle's tokenizer.json is untrusted: its pre-tokenizer may hold a regex that backtracks
until Oniguruma gives up, and the library then panics. A Rust panic reaches Python as
`pyo3_runtime.PanicException`, a BaseException (not an Exception), and Rust's panic hook has
already written its message, and with RUST_BACKTRACE a backtrace, straight to file descriptor 2.
`call` runs such a call with descriptor 2 pointed at a scratch file and turns a panic into
LsaqRuntimeError; what other threads wrote meanwhile is copied to the real stderr afterwards
unless the call panicked (then the window's text is the panic's, and is dropped). The runtime's
own stderr lines take STDERR_LOCK, so none of them is written inside such a window.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Callable, TypeVar

from .errors import LsaqRuntimeError, first_line

T = TypeVar("T")
STDERR_LOCK = threading.RLock()
_scratch: int | None = None


def is_panic(e: BaseException) -> bool:
    """A Rust panic surfacing through pyo3 (pyo3_runtime.PanicException)."""
    return type(e).__name__ == "PanicException"


def _scratch_fd() -> int | None:
    global _scratch
    if _scratch is None:
        try:
            f = tempfile.TemporaryFile()
            _scratch = os.dup(f.fileno())
            f.close()
        except OSError:
            return None
    return _scratch


def call(fn: Callable[..., T], *args, what: str, **kwargs) -> T:
    """fn(*args, **kwargs); a panic or an error of the library becomes LsaqRuntimeError("{what}:
    ...") and Rust's panic text never reaches the terminal."""
    with STDERR_LOCK:
        scratch = _scratch_fd()
        saved = None
        if scratch is not None:
            try:
                sys.stderr.flush()
                saved = os.dup(2)
                os.ftruncate(scratch, 0)
                os.lseek(scratch, 0, os.SEEK_SET)
                os.dup2(scratch, 2)
            except (OSError, ValueError):
                saved = None
        panicked = False
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if is_panic(e):
                panicked = True
                raise LsaqRuntimeError(f"{what}: the tokenizer library crashed on it "
                                       f"({first_line(e)})") from None
            if isinstance(e, Exception) and not isinstance(e, LsaqRuntimeError):
                raise LsaqRuntimeError(f"{what}: {first_line(e)}") from None
            raise
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                if not panicked:
                    _replay(scratch)


def _replay(fd: int) -> None:
    """Copy what others wrote to descriptor 2 during the window to the real stderr."""
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if not size:
            return
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, min(size, 1 << 20))
        while data:
            data = data[os.write(2, data):]
    except OSError:
        pass
