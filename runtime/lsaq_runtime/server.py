"""`lsaq-run serve`: the OpenAI API over HTTP (Starlette on uvicorn), in front of an Engine.

    POST /v1/chat/completions, POST /v1/completions   (stream: server-sent events, or not)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text)

Concurrency: one generation at a time. Requests wait in the engine's FIFO queue (bounded); the
worker thread generates and hands text to the request's event loop. A client that disconnects
(streaming or not) cancels its job: it leaves the queue, or its generation stops at the next
token. Needs the `serve` extra (starlette, uvicorn); the rest of the runtime does not.

Connections are bounded (`_ConnectionGuard`): a request head must arrive within
HEADER_TIMEOUT_S of connecting (or of the previous response), a body within BODY_TIMEOUT_S, and
at most `max_connections` are open; at the cap the connection that has waited longest for its
request head is closed to make room (a slow or idle client, never one whose request is being
answered), and only when none waits is the newcomer refused with a 503. Log lines from the
HTTP stack are one line each, without tracebacks, and a repeated one at most every
LOG_REPEAT_S (`_OneLineLog`). SIGTERM and SIGINT shut down gracefully: the engine stops taking
requests, queued ones get a 503 JSON, a running stream ends with an error event and [DONE],
and the engine is closed before the process exits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import openai_api as api
from .adaptive import Engine, Job, QueueFull, ServerClosing
from .errors import LsaqRuntimeError, first_line, printable
from .sampling import Sampler

MAX_BODY = 4 << 20   # far more than any prompt that fits a context window
DEBUG_ENV = "LSAQ_DEBUG"
# A client has this long to send its request head after connecting (or after the previous
# response, on a kept-alive connection), and this long for a body of up to MAX_BODY.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
DEFAULT_MAX_CONNECTIONS = 2048
FD_RESERVE = 64      # descriptors kept for everything but connections (files, pipes, logs)
LOG_REPEAT_S = 10.0  # the same HTTP-stack message at most this often


def model_id(manifest: dict) -> str:
    """The id clients send as 'model': the bundle's model name, lower case, no spaces."""
    name = re.sub(r"[^a-z0-9._-]+", "-", manifest["model"]["name"].lower()).strip("-")
    return name or "lsaq"


class _ErrorJSON(JSONResponse):
    """Error bodies echo what the client sent (a field name, a model id), which may hold a lone
    surrogate that UTF-8 cannot encode: ASCII JSON escapes it instead of failing."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


def _error(e: api.ApiError) -> JSONResponse:
    return _ErrorJSON(e.body(), status_code=e.status, headers=e.headers)


def create_app(engine: Engine, name: str | None = None, api_key: str | None = None,
               log=None) -> Starlette:
    """The ASGI app. api_key: when set, /v1/* needs `Authorization: Bearer KEY` (what OpenAI
    clients send); /health and /metrics stay open for monitoring."""
    served = name or model_id(engine.manifest)
    created = int(time.time())
    log = log or engine.log

    def guarded(handler, authenticated: bool = True):
        """Every endpoint answers JSON, whatever happens: no tracebacks to clients."""
        async def endpoint(request: Request):
            try:
                if api_key and authenticated:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                        raise api.ApiError("Incorrect API key provided: send the server's key "
                                           "as 'Authorization: Bearer KEY' (--api-key)",
                                           code="invalid_api_key", status=401)
                return await handler(request)
            except api.ApiError as e:
                return _error(e)
            except ClientDisconnect:  # gone while sending its request: nobody to answer
                return Response(status_code=499)
            except Exception as e:
                if os.environ.get(DEBUG_ENV):
                    traceback.print_exc()
                log(f"{request.method} {request.url.path}: unexpected {type(e).__name__}: "
                    f"{first_line(e)} (a bug in lsaq; set {DEBUG_ENV}=1 for the traceback)")
                return _error(api.ApiError(
                    f"internal error ({type(e).__name__}: {first_line(e)}); this is a bug in "
                    "lsaq, please report it", status=500, type="server_error",
                    code="internal_error"))
        return endpoint

    def check_model(p: api.Params) -> None:
        if p.model != served:
            raise api.ApiError(f"The model '{p.model}' does not exist; this server serves "
                               f"'{served}' (GET /v1/models)", "model", "model_not_found",
                               status=404, type="invalid_request_error")

    async def read_body(request: Request) -> dict:
        chunks, size = [], 0

        async def read():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise api.ApiError(f"the request body is larger than {MAX_BODY >> 20} MiB",
                                       code="body_too_large", status=413)
                chunks.append(chunk)
        try:  # a client trickling its body must not hold a connection for ever
            await asyncio.wait_for(read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise api.ApiError(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s "
                               f"({size:,} bytes came)", code="request_timeout", status=408,
                               headers={"Connection": "close"}) from None
        return api.parse_json(b"".join(chunks))

    async def encode(prompt, chat: bool, param: str) -> list[int]:
        if isinstance(prompt, list) and not chat:
            return list(prompt)                          # token ids, checked by the parser
        if chat and not engine.codec.chat_template:
            raise api.ApiError("this bundle has no chat template (tokenizer.chat_template); "
                               "send a plain prompt to POST /v1/completions instead", param,
                               "no_chat_template")
        try:  # the chat template renders in a child process: off the event loop
            return await run_in_threadpool(engine.encode, prompt, chat)
        except LsaqRuntimeError as e:
            raise api.ApiError(str(e), param, "invalid_prompt") from None

    async def generate(request: Request, chat: bool):
        body = await read_body(request)
        p = api.parse_chat(body) if chat else \
            api.parse_completion(body, engine.manifest["model"]["vocab_size"])
        check_model(p)
        ids = await encode(p.messages if chat else p.prompt, chat,
                           "messages" if chat else "prompt")
        param = ("max_completion_tokens" if chat and "max_completion_tokens" in body
                 else "max_tokens")
        max_new = api.resolve_max_tokens(p, len(ids), engine.context, param)
        try:
            sampler = Sampler(p.temperature, p.top_k, p.top_p, p.seed)
        except LsaqRuntimeError as e:
            raise api.ApiError(str(e), code="invalid_value") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):  # worker thread -> this request's event loop
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(ids, max_new, sampler, sink, stop=p.stop)
        try:
            engine.submit(job)
        except (QueueFull, ServerClosing) as e:
            raise api.ApiError(str(e), code="queue_full" if isinstance(e, QueueFull)
                               else "shutting_down", status=503, type="server_error",
                               headers={"Retry-After": "5"}) from None
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            first = await events.get()    # start, or an error while queued (timeout)
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        if first[0] == "error":
            watcher.cancel()
            return _job_error(first[1])
        variant = first[1]["variant"]
        rid, made = api.new_id(chat), int(time.time())
        headers = {"X-LSAQ-Variant": variant}
        if p.stream:
            return StreamingResponse(
                _sse(events, job, watcher, chat, rid, served, variant, made, p.include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            pieces = []
            while True:
                kind, data = await events.get()
                if kind == "text":
                    pieces.append(data)
                elif kind == "done":
                    return JSONResponse(api.completion_body(
                        chat, rid, served, variant, "".join(pieces), data["finish_reason"],
                        data["prompt_tokens"], data["completion_tokens"]), headers=headers)
                elif kind == "error":
                    return _job_error(data)
        finally:
            job.cancel()          # no-op when done; stops it when this handler is cancelled
            watcher.cancel()

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def completions(request: Request):
        return await generate(request, chat=False)

    def model_card() -> dict:
        return {"id": served, "object": "model", "created": created, "owned_by": "lsaq"}

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request):
        if request.path_params["model"] != served:
            raise api.ApiError(f"The model '{request.path_params['model']}' does not exist; "
                               f"this server serves '{served}'", "model", "model_not_found",
                               status=404)
        return JSONResponse(model_card())

    async def health(request: Request):
        s = engine.status()
        # 503 while paused: a load balancer sends clients elsewhere; the body says why.
        return JSONResponse(s, status_code=503 if s["status"] == "paused" else 200)

    async def metrics(request: Request):
        text = engine.metrics()
        guard = getattr(request.app.state, "guard", None)
        if guard is not None:
            text += (f"# HELP lsaq_http_connections_open Open HTTP connections.\n"
                     f"# TYPE lsaq_http_connections_open gauge\n"
                     f"lsaq_http_connections_open {len(guard.open)}\n"
                     f"# HELP lsaq_http_connections_limit Most HTTP connections open at once.\n"
                     f"# TYPE lsaq_http_connections_limit gauge\n"
                     f"lsaq_http_connections_limit {guard.max}\n"
                     f"# HELP lsaq_http_connections_closed_total Connections the server closed: "
                     f"evicted at the cap, refused at the cap, no request head in time.\n"
                     f"# TYPE lsaq_http_connections_closed_total counter\n"
                     + "".join(f'lsaq_http_connections_closed_total{{reason="{k}"}} {v}\n'
                               for k, v in guard.counts.items()))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            msg = (f"no such endpoint: {request.method} {request.url.path}; this server has "
                   "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET "
                   "/health and GET /metrics")
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return _ErrorJSON(api.error_body(msg, code=str(exc.status_code)),
                          status_code=exc.status_code, headers=getattr(exc, "headers", None))

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/models/{model:path}", guarded(one_model), methods=["GET"]),
        Route("/health", guarded(health, authenticated=False), methods=["GET"]),
        Route("/metrics", guarded(metrics, authenticated=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def _job_error(err: dict) -> JSONResponse:
    status = err["status"]   # 503 (paused too long, shutting down), 500, 499 (client gone)
    headers = {"Retry-After": "5"} if status == 503 else None
    return _ErrorJSON(api.error_body(err["message"], "server_error", None, err["code"]),
                      status_code=status, headers=headers)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away. After the body is read, the next ASGI message
    of this request is its disconnect (uvicorn also sends it once the response is complete,
    when cancelling is a no-op)."""
    try:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return
    except asyncio.CancelledError:
        pass
    except Exception:  # a server without a disconnect message: the stream's end still cancels
        pass


def _sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _sse(events: asyncio.Queue, job: Job, watcher: asyncio.Task, chat: bool, rid: str,
               model: str, variant: str, created: int, include_usage: bool):
    try:
        if chat:
            yield _sse_event(api.chunk_body(chat, rid, model, variant, created, role=True))
        while True:
            kind, data = await events.get()
            if kind == "text":
                yield _sse_event(api.chunk_body(chat, rid, model, variant, created, text=data))
            elif kind == "done":
                yield _sse_event(api.chunk_body(chat, rid, model, variant, created,
                                                finish=data["finish_reason"]))
                if include_usage:
                    yield _sse_event(api.chunk_body(
                        chat, rid, model, variant, created,
                        usage_=api.usage(data["prompt_tokens"], data["completion_tokens"])))
                yield b"data: [DONE]\n\n"
                return
            elif kind == "error":  # headers are sent: the error goes in the stream
                yield _sse_event(api.error_body(data["message"], "server_error", None,
                                                data["code"]))
                yield b"data: [DONE]\n\n"   # the stream still ends as streams end
                return
    finally:
        job.cancel()     # the client went away mid-stream (or the stream ended: no-op)
        watcher.cancel()


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
            from .rustguard import STDERR_LOCK

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
