"""Render a bundle's chat template with bounded time, memory and output.

The template comes from the bundle, so it is untrusted code. Jinja2's immutable sandbox (>= 3.1.6,
which fixed CVE-2025-27516's escape to `os`) stops it from reaching Python objects, but not from
looping for hours or building gigabytes of text: a sandbox cannot bound work. So on POSIX the
template renders in a forked child with a memory limit, a CPU-time limit and an output cap, and
the parent kills it at a wall-clock deadline. The child returns its result as JSON over a pipe.
Without fork (Windows) it renders in-process with the output cap only.
"""

from __future__ import annotations

import json
import os
import select
import signal
import time

from .errors import LsaqRuntimeError

TIMEOUT_S = 5.0
MAX_OUTPUT_CHARS = 1 << 20      # far more than any prompt that fits a context window
CHILD_EXTRA_MEMORY = 512 << 20  # what the child may allocate beyond what it inherits


class _TooLong(Exception):
    pass


def _render(template: str, variables: dict, max_chars: int) -> str:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    out, n = [], 0
    for chunk in env.from_string(template).generate(**variables):
        n += len(chunk)
        if n > max_chars:
            raise _TooLong()
        out.append(chunk)
    return "".join(out)


def _describe(e: BaseException) -> str:
    if isinstance(e, _TooLong):
        return "its output exceeded the limit"
    if isinstance(e, MemoryError):
        return "it ran out of its memory allowance"
    if isinstance(e, RecursionError):
        return "it recursed too deeply"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def _data_limit_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _child(wfd: int, template: str, variables: dict, max_chars: int, timeout: float) -> None:
    try:
        import resource

        cpu = int(timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        data = _data_limit_bytes()
        if data is not None:  # RLIMIT_DATA counts the heap and private anonymous mappings
            lim = data + CHILD_EXTRA_MEMORY
            resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
        payload = {"ok": _render(template, variables, max_chars)}
    except BaseException as e:  # everything becomes a message for the parent
        payload = {"error": _describe(e)}
    try:
        raw = json.dumps(payload).encode()
    except BaseException:
        raw = b'{"error": "its output could not be encoded"}'
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(wfd, view):]
    finally:
        os._exit(0)


def render(template: str, variables: dict, timeout: float | None = None,
           max_chars: int | None = None) -> str:
    """The rendered template; LsaqRuntimeError naming the problem otherwise."""
    timeout = TIMEOUT_S if timeout is None else timeout
    max_chars = MAX_OUTPUT_CHARS if max_chars is None else max_chars
    import jinja2.sandbox  # noqa: F401  imported before the fork, so the child need not

    if not hasattr(os, "fork"):
        try:
            return _render(template, variables, max_chars)
        except Exception as e:
            raise LsaqRuntimeError(f"the bundle's chat template failed: {_describe(e)}") from None
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(rfd)
        _child(wfd, template, variables, max_chars, timeout)
    os.close(wfd)
    chunks, size, deadline, timed_out = [], 0, time.monotonic() + timeout, False
    # JSON escapes can grow a character to 12 bytes; anything longer is over the cap anyway.
    limit = 12 * max_chars + 4096
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([rfd], [], [], left)
            if not ready:
                continue
            b = os.read(rfd, 1 << 20)
            if not b:
                break
            size += len(b)
            if size > limit:
                break
            chunks.append(b)
    finally:
        os.close(rfd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    if timed_out:
        raise LsaqRuntimeError(f"the bundle's chat template did not finish within {timeout:.0f} s "
                               "(it loops too long); fix tokenizer.chat_template or run without --chat")
    try:
        result = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LsaqRuntimeError("the bundle's chat template failed: it was stopped (memory, CPU "
                               "time or output limit)") from None
    if "error" in result:
        raise LsaqRuntimeError(f"the bundle's chat template failed: {result['error']}; fix "
                               "tokenizer.chat_template or run without --chat")
    return result["ok"]
