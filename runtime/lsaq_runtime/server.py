"""`lsaq-run serve`: the OpenAI API over HTTP (Starlette on uvicorn), in front of an Engine.

    POST /v1/chat/completions, POST /v1/completions   (stream: server-sent events, or not)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text)

Concurrency: one generation at a time. Requests wait in the engine's FIFO queue (bounded); the
worker thread generates and hands text to the request's event loop. A client that disconnects
(streaming or not) cancels its job: it leaves the queue, or its generation stops at the next
token. Needs the `serve` extra (starlette, uvicorn); the rest of the runtime does not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import socket
import threading
import time
import traceback
from contextlib import contextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import openai_api as api
from .adaptive import Engine, Job, QueueFull, ServerClosing
from .errors import LsaqRuntimeError, first_line
from .sampling import Sampler

MAX_BODY = 4 << 20   # far more than any prompt that fits a context window
DEBUG_ENV = "LSAQ_DEBUG"


def model_id(manifest: dict) -> str:
    """The id clients send as 'model': the bundle's model name, lower case, no spaces."""
    name = re.sub(r"[^a-z0-9._-]+", "-", manifest["model"]["name"].lower()).strip("-")
    return name or "lsaq"


def _error(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


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
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise api.ApiError(f"the request body is larger than {MAX_BODY >> 20} MiB",
                                   code="body_too_large", status=413)
            chunks.append(chunk)
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
        return Response(engine.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            msg = (f"no such endpoint: {request.method} {request.url.path}; this server has "
                   "POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET "
                   "/health and GET /metrics")
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return JSONResponse(api.error_body(msg, code=str(exc.status_code)),
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
    return JSONResponse(api.error_body(err["message"], "server_error", None, err["code"]),
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
    except OSError as e:
        sock.close()
        raise LsaqRuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); use another "
                               "--port (0 picks a free one)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(app, sock: socket.socket, access_log: bool = False):
    import uvicorn

    config = uvicorn.Config(app, log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=5,
                            lifespan="off")
    return uvicorn.Server(config)


def serve(engine: Engine, sock: socket.socket, name: str | None = None,
          access_log: bool = False, api_key: str | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM), then stop the engine."""
    server = make_server(create_app(engine, name, api_key), sock, access_log)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully, then re-raised Ctrl-C: done
        pass
    finally:
        engine.close()
        done = engine.counters["requests"]
        engine.log(f"stopped after {sum(done.values())} requests "
                   f"({', '.join(f'{v} {k}' for k, v in done.items() if v) or 'none'})")


@contextmanager
def background(engine: Engine, host: str = "127.0.0.1", port: int = 0, name: str | None = None,
               api_key: str | None = None):
    """Serve `engine` from a thread (tests, embedding); yields the base URL."""
    sock = bind(host, port)
    server = make_server(create_app(engine, name, api_key), sock)
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
