"""The OpenAI API's request checking and response shapes, for `lsaq-run serve` (no web deps).

Every problem with a request becomes an ApiError that the server sends as OpenAI sends its own:
{"error": {"message", "type", "param", "code"}} with status 400 (404 for an unknown model or
path). Fields are checked by type and range; a field this server does not know is refused by
name (OpenAI's own wording), and a known field it cannot honour (tools, logprobs, n > 1,
penalties) is refused with what to do instead, so a client never gets an answer that silently
ignored what it asked for. Harmless bookkeeping fields are accepted and ignored (IGNORED).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4            # as OpenAI
DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's default max_tokens for /v1/completions
MIN_TEMPERATURE = 1e-5  # sampling.MIN_TEMPERATURE: below it (but 0) a temperature is a mistake
MAX_SEED = 2**64 - 1    # numpy's generators take seeds in [0, 2**64)

# Accepted and ignored: they describe the request (who, what for) and change no token.
IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
           "prompt_cache_retention", "parallel_tool_calls"}
SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream",
            "stream_options", "stop", "seed", "frequency_penalty", "presence_penalty",
            "logit_bias", "logprobs"}
CHAT_FIELDS = SAMPLING | IGNORED | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
    "tool_choice", "functions", "function_call", "modalities", "audio", "prediction",
    "reasoning_effort", "verbosity", "web_search_options"}
COMPLETION_FIELDS = SAMPLING | IGNORED | {"prompt", "echo", "best_of", "suffix"}
ROLES = {"system", "developer", "user", "assistant"}


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = \
            message, param, code, status, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; strict (no NaN or Infinity)."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise ApiError("the JSON body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if hasattr(e, "lineno") else ""
        what = e.msg if hasattr(e, "msg") else str(e)
        raise ApiError(f"We could not parse the JSON body of your request: {what}{where}. "
                       "Send a JSON object with Content-Type: application/json.",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {_kind(body)}",
                       code="invalid_json")
    return body


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _int(body: dict, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise ApiError(f"'{name}' must be an integer, not {_kind(v)} ({_short(v)})", name,
                           "invalid_type")
    if lo is not None and v < lo:
        raise ApiError(f"'{name}' must be at least {lo} (got {v})", name, "invalid_value")
    if hi is not None and v > hi:
        raise ApiError(f"'{name}' must be at most {hi} (got {v})", name, "invalid_value")
    return v


def _num(body: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"'{name}' must be a number, not {_kind(v)} ({_short(v)})", name,
                       "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        low = f"more than {lo:g}" if lo_open else f"at least {lo:g}"
        raise ApiError(f"'{name}' must be {low} and at most {hi:g} (got {v:g})", name,
                       "invalid_value")
    return float(v)


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None or isinstance(v, bool):
        return v
    raise ApiError(f"'{name}' must be true or false, not {_kind(v)} ({_short(v)})", name,
                   "invalid_type")


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(v: str, where: str) -> str:
    """A string the tokenizer can take: JSON may carry a lone UTF-16 surrogate ("\\ud800"),
    which is not text."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(f"'{where}' holds a lone UTF-16 surrogate ({v[e.start]!r} at character "
                       f"{e.start}), which is not text; send valid Unicode", where,
                       "invalid_value") from None
    return v


def _unsupported(name: str, why: str) -> ApiError:
    return ApiError(f"'{name}' is not supported by this server: {why}", name, "unsupported_parameter")


@dataclass
class Params:
    """A checked request."""
    model: str
    prompt: str | list[int] | None = None           # completions
    messages: list[dict] | None = None               # chat (role, content as text)
    max_tokens: int | None = None
    temperature: float = 1.0                         # OpenAI's default
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _common(body: dict, allowed: set[str]) -> Params:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise ApiError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0],
                       "unknown_parameter")
    model = body.get("model")
    if model is None:
        raise ApiError("you must provide a model parameter ('model': see GET /v1/models)",
                       "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise ApiError(f"'model' must be a string, not {_kind(model)}", "model", "invalid_type")
    p = Params(model=model)
    p.max_tokens = _int(body, "max_tokens", lo=1)
    t = _num(body, "temperature", 0.0, 2.0)
    if t is not None and 0 < t < MIN_TEMPERATURE:
        raise ApiError(f"'temperature' {t:g} is too small to sample with (below "
                       f"{MIN_TEMPERATURE:g} only the most likely token is left); send 0 for "
                       "greedy decoding", "temperature", "invalid_value")
    p.temperature = 1.0 if t is None else t
    tp = _num(body, "top_p", 0.0, 1.0, lo_open=True)
    p.top_p = 1.0 if tp is None else tp
    p.top_k = _int(body, "top_k", lo=0) or 0       # not OpenAI's; llama.cpp and vLLM take it
    n = _int(body, "n", lo=1)
    if n not in (None, 1):
        raise _unsupported("n", f"one choice per request (got n={n}); send {n} requests instead")
    p.stream = bool(_bool(body, "stream"))
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise ApiError(f"'stream_options' must be an object, not {_kind(so)}",
                           "stream_options", "invalid_type")
        extra = sorted(set(so) - {"include_usage", "include_obfuscation"})
        if extra:
            raise ApiError(f"Unrecognized stream_options argument supplied: {extra[0]}",
                           f"stream_options.{extra[0]}", "unknown_parameter")
        if not p.stream:
            raise ApiError("'stream_options' is only allowed when 'stream' is true",
                           "stream_options", "invalid_value")
        p.include_usage = bool(_bool(so, "include_usage"))
        _bool(so, "include_obfuscation")   # nothing to obfuscate on a local server
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ApiError("'stop' must be a string or an array of strings", "stop",
                           "invalid_type")
        if len(stop) > MAX_STOP:
            raise ApiError(f"'stop' takes at most {MAX_STOP} sequences (got {len(stop)})",
                           "stop", "invalid_value")
        p.stop = [_text(s, "stop") for s in stop if s]
    p.seed = _int(body, "seed", lo=0, hi=MAX_SEED)
    for name in ("frequency_penalty", "presence_penalty"):
        v = _num(body, name, -2.0, 2.0)
        if v:
            raise _unsupported(name, "penalties are not implemented; leave it out or send 0")
    lb = body.get("logit_bias")
    if lb not in (None, {}):
        raise _unsupported("logit_bias", "leave it out")
    for name in IGNORED:  # accepted, but still well-formed
        v = body.get(name)
        if name in ("user", "safety_identifier", "prompt_cache_key", "service_tier",
                    "prompt_cache_retention") and v is not None and not isinstance(v, str):
            raise ApiError(f"'{name}' must be a string, not {_kind(v)}", name, "invalid_type")
        if name == "metadata" and v is not None and not isinstance(v, dict):
            raise ApiError(f"'metadata' must be an object, not {_kind(v)}", name, "invalid_type")
        if name in ("store", "parallel_tool_calls"):
            _bool(body, name)
    return p


def parse_chat(body: dict) -> Params:
    p = _common(body, CHAT_FIELDS)
    mct = _int(body, "max_completion_tokens", lo=1)
    if mct is not None:
        if p.max_tokens is not None and p.max_tokens != mct:
            raise ApiError("'max_tokens' and 'max_completion_tokens' differ; send one of them",
                           "max_completion_tokens", "invalid_value")
        p.max_tokens = mct
    lp = _bool(body, "logprobs")
    if lp:
        raise _unsupported("logprobs", "log probabilities are not returned")
    if body.get("top_logprobs") is not None:
        raise _unsupported("top_logprobs", "log probabilities are not returned")
    for name in ("tools", "tool_choice", "functions", "function_call"):
        if body.get(name) not in (None, [], "none"):
            raise _unsupported(name, "this server does not call tools")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise _unsupported("response_format", "only {\"type\": \"text\"}")
    mods = body.get("modalities")
    if mods is not None and mods != ["text"]:
        raise _unsupported("modalities", "only [\"text\"]")
    for name in ("audio", "prediction", "reasoning_effort", "verbosity", "web_search_options"):
        if body.get(name) is not None:
            raise _unsupported(name, "leave it out")
    p.messages = _messages(body.get("messages"))
    return p


def _messages(msgs) -> list[dict]:
    if msgs is None:
        raise ApiError("you must provide a messages parameter", "messages",
                       "missing_required_parameter")
    if not isinstance(msgs, list):
        raise ApiError(f"'messages' must be an array, not {_kind(msgs)}", "messages",
                       "invalid_type")
    if not msgs:
        raise ApiError("'messages' must hold at least one message", "messages", "empty_array")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"'{where}' must be an object with 'role' and 'content', not "
                           f"{_kind(m)}", where, "invalid_type")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise ApiError(f"'{where}.{extra[0]}' is not supported by this server (text "
                           "messages only: role, content, name)", f"{where}.{extra[0]}",
                           "unsupported_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(f"'{where}.role' must be one of {', '.join(sorted(ROLES))} (got "
                           f"{_short(role)})", f"{where}.role", "invalid_value")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise ApiError(f"'{where}.name' must be a string", f"{where}.name", "invalid_type")
        if name is not None:
            _text(name, f"{where}.name")
        out.append({"role": "system" if role == "developer" else role,   # the template's name
                    "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(c, where: str) -> str:
    if isinstance(c, str):
        return _text(c, where)
    if isinstance(c, list):  # content parts: text only
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ApiError(f"'{where}[{j}]' must be a text part {{\"type\": \"text\", "
                               "\"text\": \"...\"}} (this server reads text only)",
                               f"{where}[{j}]", "invalid_value")
            texts.append(_text(part["text"], f"{where}[{j}].text"))
        return "".join(texts)
    raise ApiError(f"'{where}' must be a string or an array of text parts, not {_kind(c)}",
                   where, "invalid_type")


def parse_completion(body: dict, vocab_size: int) -> Params:
    p = _common(body, COMPLETION_FIELDS)
    if body.get("logprobs") is not None:
        raise _unsupported("logprobs", "log probabilities are not returned")
    if _bool(body, "echo"):
        raise _unsupported("echo", "the prompt is not repeated; leave it out")
    if _int(body, "best_of", lo=1) not in (None, 1):
        raise _unsupported("best_of", "one candidate per request")
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix", "no fill-in-the-middle")
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError("you must provide a prompt parameter", "prompt",
                       "missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, str):
        p.prompt = _text(prompt, "prompt")
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ApiError(f"'prompt' holds token id {bad}, outside the vocabulary of "
                           f"{vocab_size}", "prompt", "invalid_value")
        p.prompt = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise _unsupported("prompt", f"one prompt per request (got {len(prompt)}); send "
                           "them as separate requests")
    else:
        raise ApiError("'prompt' must be a string or an array of token ids", "prompt",
                       "invalid_type")
    if p.max_tokens is None:
        p.max_tokens = DEFAULT_COMPLETION_TOKENS
    return p


def resolve_max_tokens(p: Params, prompt_tokens: int, context: int, param: str) -> int:
    """New tokens to generate: what was asked, or the rest of the context; 400 when the prompt
    and the request do not fit the server's context."""
    room = context - prompt_tokens
    if p.max_tokens is None:
        if room < 1:
            raise ApiError(f"This model's maximum context length is {context} tokens. "
                           f"However, your messages resulted in {prompt_tokens} tokens. Please "
                           "reduce the length of the messages (or start the server with a "
                           "larger --context).", "messages", "context_length_exceeded")
        return room
    if prompt_tokens + p.max_tokens > context:
        raise ApiError(f"This model's maximum context length is {context} tokens. However, you "
                       f"requested {prompt_tokens + p.max_tokens} tokens ({prompt_tokens} in the "
                       f"prompt, {p.max_tokens} for the completion). Please reduce the prompt "
                       f"or '{param}' (at most {max(room, 0)} here), or start the server with a "
                       "larger --context.", param, "context_length_exceeded")
    return p.max_tokens


# -- responses ----------------------------------------------------------------------------------
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def fingerprint(variant: str | None) -> str:
    """system_fingerprint says which variant answered (it changes as the server re-plans)."""
    return f"lsaq-{variant}"


def completion_body(chat: bool, rid: str, model: str, variant: str, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": None, "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model,
            "system_fingerprint": fingerprint(variant), "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(chat: bool, rid: str, model: str, variant: str, created: int,
               text: str | None = None, finish: str | None = None, role: bool = False,
               usage_: dict | None = None) -> dict:
    if usage_ is not None:  # the include_usage chunk: no choices
        choices = []
    elif chat:
        delta = {"role": "assistant", "content": ""} if role else \
            ({"content": text} if text is not None else {})
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    else:
        choices = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": fingerprint(variant),
            "choices": choices}
    if usage_ is not None or chat:
        body["usage"] = usage_
    return body
