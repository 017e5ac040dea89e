"""The HTTP handlers of `lsaq-run serve`: the OpenAI API (Starlette) in front of an Engine.

    POST /v1/chat/completions, POST /v1/completions   (stream: server-sent events, or not)
    GET  /v1/models, /v1/models/{id}, /health, /metrics (Prometheus text)

A handler parses the request (openai_api.py), encodes the prompt, submits a Job to the engine
and turns the job's events into a response; a client that disconnects (streaming or not)
cancels its job. Every endpoint answers JSON, whatever happens: no tracebacks to clients.
A request body must arrive within BODY_TIMEOUT_S and hold at most MAX_BODY bytes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import re
import time
import traceback
from functools import partial

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import LsaqRuntimeError, first_line
from ..sampling import Sampler
from . import metrics
from . import openai_api as api
from .engine import Engine, Job, QueueFull, ServerClosing

MAX_BODY = 4 << 20   # far more than any prompt that fits a context window
BODY_TIMEOUT_S = 30.0
DEBUG_ENV = "LSAQ_DEBUG"
ENDPOINTS = ("POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health "
             "and GET /metrics")


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


def _job_error(err: dict) -> JSONResponse:
    status = err["status"]   # 503 (paused too long, shutting down), 500, 499 (client gone)
    headers = {"Retry-After": "5"} if status == 503 else None
    return _ErrorJSON(api.error_body(err["message"], "server_error", None, err["code"]),
                      status_code=status, headers=headers)


# ------------------------------------------------------------------------------- the handlers
class Handlers:
    """The endpoints of one server: `engine` serves model id `served`; with `api_key` set,
    /v1/* needs `Authorization: Bearer KEY` (what OpenAI clients send), while /health and
    /metrics stay open for monitoring."""

    def __init__(self, engine: Engine, name: str | None = None, api_key: str | None = None,
                 log=None):
        self.engine, self.api_key = engine, api_key
        self.served = name or model_id(engine.manifest)
        self.created = int(time.time())
        self.log = log or engine.log

    def guarded(self, handler, authenticated: bool = True):
        """`handler` as an endpoint: the API key checked, every failure a JSON error."""
        async def endpoint(request: Request):
            return await self._answer(handler, request, authenticated)
        return endpoint

    async def _answer(self, handler, request: Request, authenticated: bool):
        try:
            if self.api_key and authenticated:
                self._check_key(request)
            return await handler(request)
        except api.ApiError as e:
            return _error(e)
        except ClientDisconnect:  # gone while sending its request: nobody to answer
            return Response(status_code=499)
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                traceback.print_exc()
            self.log(f"{request.method} {request.url.path}: unexpected {type(e).__name__}: "
                     f"{first_line(e)} (a bug in lsaq; set {DEBUG_ENV}=1 for the traceback)")
            return _error(api.ApiError(
                f"internal error ({type(e).__name__}: {first_line(e)}); this is a bug in "
                "lsaq, please report it", status=500, type="server_error",
                code="internal_error"))

    def _check_key(self, request: Request) -> None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise api.ApiError("Incorrect API key provided: send the server's key "
                               "as 'Authorization: Bearer KEY' (--api-key)",
                               code="invalid_api_key", status=401)

    def _check_model(self, p: api.Params) -> None:
        if p.model != self.served:
            raise api.ApiError(f"The model '{p.model}' does not exist; this server serves "
                               f"'{self.served}' (GET /v1/models)", "model", "model_not_found",
                               status=404, type="invalid_request_error")

    async def _encode(self, prompt, chat: bool, param: str) -> list[int]:
        if isinstance(prompt, list) and not chat:
            return list(prompt)                          # token ids, checked by the parser
        if chat and not self.engine.codec.chat_template:
            raise api.ApiError("this bundle has no chat template (tokenizer.chat_template); "
                               "send a plain prompt to POST /v1/completions instead", param,
                               "no_chat_template")
        try:  # the chat template renders in a child process: off the event loop
            return await run_in_threadpool(self.engine.encode, prompt, chat)
        except LsaqRuntimeError as e:
            raise api.ApiError(str(e), param, "invalid_prompt") from None

    def _submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except (QueueFull, ServerClosing) as e:
            raise api.ApiError(str(e), code="queue_full" if isinstance(e, QueueFull)
                               else "shutting_down", status=503, type="server_error",
                               headers={"Retry-After": "5"}) from None

    async def generate(self, request: Request, chat: bool):
        body = await read_body(request)
        p = api.parse_chat(body) if chat else \
            api.parse_completion(body, self.engine.manifest["model"]["vocab_size"])
        self._check_model(p)
        ids = await self._encode(p.messages if chat else p.prompt, chat,
                                 "messages" if chat else "prompt")
        param = ("max_completion_tokens" if chat and "max_completion_tokens" in body
                 else "max_tokens")
        max_new = api.resolve_max_tokens(p, len(ids), self.engine.context, param)
        try:
            sampler = Sampler(p.temperature, p.top_k, p.top_p, p.seed)
        except LsaqRuntimeError as e:
            raise api.ApiError(str(e), code="invalid_value") from None
        events: asyncio.Queue = asyncio.Queue()
        # the worker thread hands each event to this request's event loop
        sink = partial(asyncio.get_running_loop().call_soon_threadsafe, events.put_nowait)
        job = Job(ids, max_new, sampler, sink, stop=p.stop)
        self._submit(job)
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
                _sse(events, job, watcher, chat, rid, self.served, variant, made,
                     p.include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _whole(events, chat, rid, self.served, variant, headers)
        finally:
            job.cancel()          # no-op when done; stops it when this handler is cancelled
            watcher.cancel()

    async def chat_completions(self, request: Request):
        return await self.generate(request, chat=True)

    async def completions(self, request: Request):
        return await self.generate(request, chat=False)

    def model_card(self) -> dict:
        return {"id": self.served, "object": "model", "created": self.created, "owned_by": "lsaq"}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def one_model(self, request: Request):
        if request.path_params["model"] != self.served:
            raise api.ApiError(f"The model '{request.path_params['model']}' does not exist; "
                               f"this server serves '{self.served}'", "model", "model_not_found",
                               status=404)
        return JSONResponse(self.model_card())

    async def health(self, request: Request):
        s = self.engine.status()
        # 503 while paused: a load balancer sends clients elsewhere; the body says why.
        return JSONResponse(s, status_code=503 if s["status"] == "paused" else 200)

    async def metrics(self, request: Request):
        text = self.engine.metrics()
        guard = getattr(request.app.state, "guard", None)
        if guard is not None:
            text += metrics.connections_text(guard)
        return Response(text, media_type=metrics.CONTENT_TYPE)


async def http_error(request: Request, exc: HTTPException):
    """Starlette's own errors (no such route, method not allowed) as OpenAI-style JSON."""
    if exc.status_code == 404:
        msg = (f"no such endpoint: {request.method} {request.url.path}; this server has "
               f"{ENDPOINTS}")
    elif exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}"
    else:
        msg = str(exc.detail)
    return _ErrorJSON(api.error_body(msg, code=str(exc.status_code)),
                      status_code=exc.status_code, headers=getattr(exc, "headers", None))


def create_app(engine: Engine, name: str | None = None, api_key: str | None = None,
               log=None) -> Starlette:
    """The ASGI app (see Handlers for name, api_key and log)."""
    h = Handlers(engine, name, api_key, log)
    routes = [
        Route("/v1/chat/completions", h.guarded(h.chat_completions), methods=["POST"]),
        Route("/v1/completions", h.guarded(h.completions), methods=["POST"]),
        Route("/v1/models", h.guarded(h.models), methods=["GET"]),
        Route("/v1/models/{model:path}", h.guarded(h.one_model), methods=["GET"]),
        Route("/health", h.guarded(h.health, authenticated=False), methods=["GET"]),
        Route("/metrics", h.guarded(h.metrics, authenticated=False), methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# ------------------------------------------------------------------------------- requests
async def read_body(request: Request) -> dict:
    """The request's JSON body: at most MAX_BODY bytes, arriving within BODY_TIMEOUT_S (a
    client trickling its body must not hold a connection for ever)."""
    chunks: list[bytes] = []
    try:
        await asyncio.wait_for(_collect(request, chunks), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise api.ApiError(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s "
                           f"({sum(map(len, chunks)):,} bytes came)", code="request_timeout",
                           status=408, headers={"Connection": "close"}) from None
    return api.parse_json(b"".join(chunks))


async def _collect(request: Request, chunks: list[bytes]) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise api.ApiError(f"the request body is larger than {MAX_BODY >> 20} MiB",
                               code="body_too_large", status=413)
        chunks.append(chunk)


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


# ------------------------------------------------------------------------------- responses
async def _whole(events: asyncio.Queue, chat: bool, rid: str, model: str, variant: str,
                 headers: dict) -> JSONResponse:
    """A non-streamed answer: the job's text collected until it is done (or fails)."""
    pieces = []
    while True:
        kind, data = await events.get()
        if kind == "text":
            pieces.append(data)
        elif kind == "done":
            return JSONResponse(api.completion_body(
                chat, rid, model, variant, "".join(pieces), data["finish_reason"],
                data["prompt_tokens"], data["completion_tokens"]), headers=headers)
        elif kind == "error":
            return _job_error(data)


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
