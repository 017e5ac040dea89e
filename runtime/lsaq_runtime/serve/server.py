"""Running `lsaq-run serve`: the listening socket, connection bounds, logging, uvicorn and a
graceful shutdown, around the app of http.py. Needs the `serve` extra (starlette, uvicorn); the
rest of the runtime does not.

Concurrency: one generation at a time. Requests wait in the engine's FIFO queue (bounded); the
worker thread generates and hands text to the request's event loop.

Connections are bounded (`_ConnectionGuard`): a request head must arrive within
HEADER_TIMEOUT_S of connecting (or of the previous response), a body within
http.BODY_TIMEOUT_S, and at most `max_connections` are open; at the cap the connection that has
waited longest for its request head is closed to make room (a slow or idle client, never one
whose request is being answered), and only when none waits is the newcomer refused with a 503.
Log lines from the HTTP stack are one line each, without tracebacks, and a repeated one at most
every LOG_REPEAT_S (`_OneLineLog`). SIGTERM and SIGINT shut down gracefully: the engine stops
taking requests, queued ones get a 503 JSON, a running stream ends with an error event and
[DONE], and the engine is closed before the process exits.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from contextlib import contextmanager

from ..errors import LsaqRuntimeError, first_line, printable
from . import openai_api as api
from .engine import Engine
from .http import DEBUG_ENV, create_app

# A client has this long to send its request head after connecting (or after the previous
# response, on a kept-alive connection); http.BODY_TIMEOUT_S bounds the body.
HEADER_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 2048
FD_RESERVE = 64      # descriptors kept for everything but connections (files, pipes, logs)
LOG_REPEAT_S = 10.0  # the same HTTP-stack message at most this often


# -- running it -------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise LsaqRuntimeError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)   # listen too can find the port taken
    except OSError as e:
        sock.close()
        raise LsaqRuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); use another "
                               "--port (0 picks a free one)") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def connection_cap(wanted: int | None = None) -> int:
    """Most connections open at once: `wanted` (DEFAULT_MAX_CONNECTIONS) within what the
    descriptor limit allows. The soft limit is raised to the hard one first (a server's usual
    start-up step); FD_RESERVE descriptors stay for files, pipes and logs."""
    wanted = wanted or DEFAULT_MAX_CONNECTIONS
    try:
        import resource   # POSIX

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    except (ImportError, ValueError, OSError):
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class _ConnectionGuard:
    """What every connection of one server shares: the cap, the connections waiting for a
    request head (oldest first), and counts of what the guard did (in /metrics)."""

    def __init__(self, max_connections: int, header_timeout: float | None = None):
        self.max = int(max_connections)
        self.header_timeout = float(HEADER_TIMEOUT_S if header_timeout is None else header_timeout)
        self.open: set = set()
        self.fresh: OrderedDict = OrderedDict()   # no request head yet on this connection
        self.idle: OrderedDict = OrderedDict()    # kept alive after a response, waiting again
        self.counts = {"evicted": 0, "refused": 0, "header_timeout": 0}

    def victim(self, newcomer):
        """The connection to close for a newcomer at the cap: the one waiting longest for a
        first request head, then the longest idle one; None when all are being answered."""
        for waiting in (self.fresh, self.idle):
            for conn in waiting:
                if conn is not newcomer:
                    return conn
        return None


_RAW_ERRORS = {
    408: b"Request Timeout", 503: b"Service Unavailable"}


def _raw_error(status: int, message: str) -> bytes:
    """A whole HTTP response, for connections closed before any request was parsed."""
    body = json.dumps(api.error_body(message, "server_error", None,
                                     "request_timeout" if status == 408 else "too_many_connections"),
                      ensure_ascii=True).encode()
    head = (f"HTTP/1.1 {status} ".encode() + _RAW_ERRORS[status] +
            b"\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
            str(len(body)).encode() + (b"\r\nRetry-After: 1" if status == 503 else b"") +
            b"\r\n\r\n")
    return head + body


def _guarded_protocol(guard: _ConnectionGuard):
    """uvicorn's h11 protocol with the guard's rules (uvicorn.Config(http=...) takes a class).
    It relies on H11Protocol's connection_made, data_received, on_response_complete,
    connection_lost, `cycle` (the current request) and `transport`, stable since uvicorn 0.30."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _timer = None
        _seen = None

        def connection_made(self, transport):
            super().connection_made(transport)
            guard.open.add(self)
            self._await_head(guard.fresh)
            if len(guard.open) > guard.max:
                victim = guard.victim(self)
                if victim is not None:
                    guard.counts["evicted"] += 1
                    victim._drop(None)
                else:
                    guard.counts["refused"] += 1
                    self._drop(_raw_error(503, f"the server has its maximum of {guard.max} "
                                               "connections open, all being answered; retry"))

        def _await_head(self, waiting: OrderedDict) -> None:
            """Wait for a request head; no head in time closes the connection."""
            self._seen = self.cycle
            waiting[self] = None
            self._timer = self.loop.call_later(guard.header_timeout, self._head_timeout)

        def _got_head(self) -> None:
            guard.fresh.pop(self, None)
            guard.idle.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _head_timeout(self) -> None:
            self._timer = None
            guard.counts["header_timeout"] += 1
            self._drop(_raw_error(408, f"no complete request head within "
                                       f"{guard.header_timeout:g} s"))

        def _drop(self, response: bytes | None) -> None:
            self._got_head()
            if not self.transport.is_closing():
                if response:
                    self.transport.write(response)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._timer is not None and self.cycle is not self._seen:
                self._got_head()   # the request head arrived: the app answers it now

        def on_response_complete(self) -> None:
            before = self.cycle
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is before:
                self._await_head(guard.idle)   # kept alive: the next head has a deadline too

        def connection_lost(self, exc) -> None:
            self._got_head()
            guard.open.discard(self)
            super().connection_lost(exc)

    return GuardedH11Protocol


class _OneLineLog(logging.Handler):
    """uvicorn's and asyncio's log records as one stderr line each, tracebacks left out (set
    LSAQ_DEBUG=1 to keep them), and the same message at most once per LOG_REPEAT_S with a count
    of the ones held back: thousands of misbehaving connections make a few lines, not a storm."""

    def __init__(self, throttle: bool = True):
        super().__init__()
        self.throttle = throttle
        self.last: dict[tuple, list] = {}   # (logger, message template) -> [time, held back]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from ..rustguard import STDERR_LOCK

            now = time.monotonic()
            key = (record.name, str(record.msg))
            held = 0
            if self.throttle:
                seen = self.last.get(key)
                if seen is not None and now - seen[0] < LOG_REPEAT_S:
                    seen[1] += 1
                    return
                held = seen[1] if seen else 0
                if len(self.last) > 1000:
                    self.last.clear()
                self.last[key] = [now, 0]
            msg = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                msg += f" ({type(record.exc_info[1]).__name__}: {first_line(record.exc_info[1])})"
                if os.environ.get(DEBUG_ENV):
                    msg += "\n" + "".join(traceback.format_exception(*record.exc_info))
            if held:
                msg += f" ({held} more like it in the last {LOG_REPEAT_S:g} s)"
            text = msg if os.environ.get(DEBUG_ENV) else printable(msg, newlines=False)
            with STDERR_LOCK:
                print(f"lsaq-run: http: {text}", file=sys.stderr, flush=True)
        except Exception:
            pass


def _configure_logging(access_log: bool) -> None:
    for name, throttle in (("uvicorn", True), ("uvicorn.error", True), ("asyncio", True),
                           ("uvicorn.access", False)):
        log = logging.getLogger(name)
        log.handlers[:] = [_OneLineLog(throttle)]
        log.propagate = False
        log.setLevel(logging.INFO if name == "uvicorn.access" and access_log else logging.WARNING)


def make_server(app, sock: socket.socket, access_log: bool = False,
                max_connections: int | None = None, on_exit=None):
    """The uvicorn server: the guarded h11 protocol, our one-line logging, and (on_exit) a
    callable run when SIGTERM or SIGINT asks it to stop, before it drains connections."""
    import uvicorn

    guard = _ConnectionGuard(connection_cap(max_connections))
    _configure_logging(access_log)
    config = uvicorn.Config(app, http=_guarded_protocol(guard), log_config=None,
                            log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5, lifespan="off")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # in the signal handler: the engine's shutdown takes locks, so it runs in a thread
            if on_exit is not None and not self.should_exit:
                threading.Thread(target=on_exit, name="lsaq-shutdown", daemon=True).start()
            super().handle_exit(sig, frame)

    server = Server(config)
    server.lsaq_guard = guard
    return server


def serve(engine: Engine, sock: socket.socket, name: str | None = None,
          access_log: bool = False, api_key: str | None = None,
          max_connections: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT (Ctrl-C), then shut down gracefully: no new requests,
    queued ones answered 503, a running one ended with an error event, the engine closed."""
    app = create_app(engine, name, api_key)
    server = make_server(app, sock, access_log, max_connections, on_exit=engine.begin_shutdown)
    app.state.guard = server.lsaq_guard
    # uvicorn re-raises a caught signal once it has shut down, under the handler that was in
    # place before it: the default SIGTERM handler would kill the process before the engine is
    # closed, so a quiet one is put in place.
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: done
        pass
    finally:
        engine.close()
        signal.signal(signal.SIGTERM, previous)
        done = engine.counters["requests"]
        engine.log(f"stopped after {sum(done.values())} requests "
                   f"({', '.join(f'{v} {k}' for k, v in done.items() if v) or 'none'}); "
                   "engine closed")


@contextmanager
def background(engine: Engine, host: str = "127.0.0.1", port: int = 0, name: str | None = None,
               api_key: str | None = None, max_connections: int | None = None):
    """Serve `engine` from a thread (tests, embedding); yields the base URL."""
    sock = bind(host, port)
    app = create_app(engine, name, api_key)
    server = make_server(app, sock, max_connections=max_connections)
    app.state.guard = server.lsaq_guard
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="lsaq-http")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise LsaqRuntimeError("the HTTP server did not start")
        time.sleep(0.01)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
