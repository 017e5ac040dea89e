"""An Ollama Modelfile beside an exported GGUF: FROM, TEMPLATE, SYSTEM and stop tokens.

Ollama's TEMPLATE is a Go template, the bundle's chat template Jinja: no general translation
exists. So the Jinja template is rendered on probe conversations and read as "each message is
prefix + content + suffix by role, then a generation prompt" (ChatML, Llama 3, Gemma and most
chat templates have this form); the Go template is written from those strings, and the split is
checked by rendering both ways on other conversations. A template that does not have this form
gets no TEMPLATE line (Ollama then falls back to the GGUF's own chat template) and a note says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .export_common import MODELFILE_HEAD

ROLES = ("system", "user", "assistant")
_S, _U, _A, _U2, _B = "\x01SYS\x02", "\x01USR\x02", "\x01AST\x02", "\x01USR2\x02", "\x01BOS\x02"


@dataclass
class ChatForm:
    bos: str                      # text the template emits first (the BOS token's), or ""
    prefix: dict[str, str]
    suffix: dict[str, str]
    generation: str               # appended after the last message when a reply is wanted
    default_system: str | None    # the template's own system message when none is given


class _NoForm(Exception):
    pass


def _render(template: str, messages, gen: bool, bos: str, eos: str) -> str:
    from lsaq_runtime.chat_template import render

    return render(template, {"messages": messages, "add_generation_prompt": gen,
                             "bos_token": bos, "eos_token": eos})


def _cut(text: str, *marks: str) -> list[str]:
    """text split around each mark in order (each must occur once, in that order)."""
    parts, rest = [], text
    for m in marks:
        if rest.count(m) != 1:
            raise _NoForm(f"{m!r} not found once")
        a, rest = rest.split(m)
        parts.append(a)
    return parts + [rest]


def _strip_end(s: str, end: str) -> str:
    if not s.endswith(end):
        raise _NoForm("inconsistent pieces")
    return s[: len(s) - len(end)] if end else s


def chat_form(template: str, bos: str, eos: str) -> ChatForm:
    """The template's per-role pieces. The BOS token is rendered as a sentinel, so a BOS text
    equal to a role marker (SmolLM2's <|im_start|>) is not mistaken for one."""
    msg = lambda r, c: {"role": r, "content": c}  # noqa: E731

    def r(messages, gen):
        return _render(template, messages, gen, _B, eos)

    r1 = r([msg("user", _U)], False)
    r4 = r([msg("user", _U)], True)
    r3 = r([msg("user", _U), msg("assistant", _A)], False)
    r5 = r([msg("user", _U), msg("assistant", _A), msg("user", _U2)], False)
    r2 = r([msg("system", _S), msg("user", _U)], False)
    b = ""
    if r1.startswith(_B) and r2.startswith(_B):
        b = bos
        r1, r2, r3, r4, r5 = (x[len(_B):] for x in (r1, r2, r3, r4, r5))
    if any(_B in x for x in (r1, r2, r3, r4, r5)):
        raise _NoForm("the BOS token is used elsewhere than at the start")
    if not r4.startswith(r1) or not r3.startswith(r1):
        raise _NoForm("a reply prompt or a reply changes what precedes it")
    gen = r4[len(r1):]
    before_u, x_u = _cut(r1, _U)
    p_a, x_a = _cut(r3[len(r1):], _A)
    after_a = _cut(r5, _U, _A)[2]
    mid_a_u2, _ = _cut(after_a, _U2)
    if not mid_a_u2.startswith(x_a):
        raise _NoForm("assistant suffix not followed by the user prefix")
    p_u = mid_a_u2[len(x_a):]
    default = _strip_end(before_u, p_u)                  # the default system block, if any
    p_s, mid_s_u, rest = _cut(r2, _S, _U)
    if rest != x_u:
        raise _NoForm("the user suffix depends on the system message")
    x_s = _strip_end(mid_s_u, p_u)
    default_system = None
    if default:
        if not (default.startswith(p_s) and default.endswith(x_s)) or len(default) < len(p_s) + len(x_s):
            raise _NoForm("a default preamble that is not a system message")
        default_system = default[len(p_s): len(default) - len(x_s)]
    return ChatForm(b, {"system": p_s, "user": p_u, "assistant": p_a},
                    {"system": x_s, "user": x_u, "assistant": x_a}, gen, default_system)


def render_form(f: ChatForm, messages: list[dict], gen: bool) -> str:
    """What the Go template written from `f` renders (with Ollama's SYSTEM inserted as a first
    system message when none is given), preceded by the BOS text the tokenizer adds. A last
    assistant message is left open, as in Ollama's own templates (the reply continues it); the
    probes compared with Jinja therefore end with a user turn."""
    msgs = list(messages)
    if f.default_system is not None and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": f.default_system})
    out = f.bos   # from the tokenizer (add_bos) or from the template's first line
    for i, m in enumerate(msgs):
        last = i == len(msgs) - 1
        out += f.prefix[m["role"]] + m["content"]
        if not (last and m["role"] == "assistant"):
            out += f.suffix[m["role"]]
        if last and m["role"] != "assistant" and gen:
            out += f.generation
    return out


def _probe_conversations():
    m = lambda r, c: {"role": r, "content": c}  # noqa: E731
    return [
        ([m("user", "Hi there")], True),
        ([m("system", "Be brief."), m("user", "What is 2+2?")], True),
        ([m("user", "one"), m("assistant", "two"), m("user", "three")], True),
        ([m("system", "S"), m("user", "a"), m("assistant", "b"), m("user", "c"),
          m("assistant", "d"), m("user", "e\nf")], True),
        ([m("system", "S"), m("user", "a"), m("assistant", "b"), m("user", "c")], False),
    ]


def go_string(s: str) -> str:
    """A Go template string literal (json escapes are Go escapes; non-ASCII kept as UTF-8)."""
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}"


def go_template(f: ChatForm, add_bos: bool) -> str:
    lit = go_string
    # the BOS text: the tokenizer adds it when add_bos_token is set, else the template does
    lines = [lit(f.bos)] if f.bos and not add_bos else []
    lines += ["{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        "{{- if eq .Role \"system\" }}" + lit(f.prefix["system"]) + "{{ .Content }}"
        + lit(f.suffix["system"]),
        "{{- else if eq .Role \"user\" }}" + lit(f.prefix["user"]) + "{{ .Content }}"
        + lit(f.suffix["user"]),
        "{{- else if eq .Role \"assistant\" }}" + lit(f.prefix["assistant"]) + "{{ .Content }}"
        + "{{ if not $last }}" + lit(f.suffix["assistant"]) + "{{ end }}",
        "{{- end }}",
        "{{- if and $last (ne .Role \"assistant\") }}" + lit(f.generation) + "{{ end }}",
        "{{- end }}",
    ]
    return "\n".join(lines)


def token_text(reader, tid: int) -> str | None:
    tj = reader.tokenizer_json()
    for t in tj.get("added_tokens", []):
        if t.get("id") == tid:
            return t.get("content")
    for t, i in (tj.get("model") or {}).get("vocab", {}).items():
        if i == tid:
            return t
    return None


def modelfile_text(reader, gguf_name: str) -> tuple[str, list[str]]:
    """(Modelfile text, notes) for the GGUF file `gguf_name` in the same folder."""
    tok = reader.manifest["tokenizer"]
    notes = []
    bos = token_text(reader, tok["bos_token_id"]) if tok.get("bos_token_id") is not None else ""
    eos_ids = tok.get("eos_token_ids") or []
    eos_texts = [t for t in (token_text(reader, i) for i in eos_ids) if t]
    add_bos = bool(tok.get("add_bos_token"))
    lines = [MODELFILE_HEAD,
             f"# variant of {reader.model['name']}: see docs/beyond_one_machine.md",
             f"FROM ./{gguf_name}"]
    template = tok.get("chat_template")
    stops = list(eos_texts)
    if isinstance(template, str):
        try:
            form = chat_form(template, bos or "", eos_texts[0] if eos_texts else "")
            for msgs, gen in _probe_conversations():
                want = _render(template, msgs, gen, bos or "", eos_texts[0] if eos_texts else "")
                got = render_form(form, msgs, gen)
                if want != got:
                    raise _NoForm("probe conversation renders differently")
            lines.append('TEMPLATE """' + go_template(form, add_bos) + '"""')
            if form.default_system is not None:
                lines.append('SYSTEM """' + form.default_system + '"""')
            end = form.suffix["assistant"].strip()
            if end and end not in stops:
                stops.append(end)
        except _NoForm as e:
            notes.append(f"note: the chat template is not one the Modelfile's Go TEMPLATE can "
                         f"state exactly ({e}); the Modelfile leaves TEMPLATE out, so Ollama "
                         "uses the GGUF's own tokenizer.chat_template")
        except Exception as e:  # a template that fails to render (runtime error types)
            notes.append(f"note: the chat template could not be rendered ({e}); the Modelfile "
                         "has no TEMPLATE")
    else:
        notes.append("note: the bundle has no chat template; the Modelfile has no TEMPLATE")
    for s in stops:
        lines.append("PARAMETER stop " + json.dumps(s, ensure_ascii=False))
    return "\n".join(lines) + "\n", notes
