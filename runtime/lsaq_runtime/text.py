"""Text in and out: the bundle's tokenizer, its chat template, and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .errors import LsaqRuntimeError


class TextCodec:
    def __init__(self, bundle: Path, manifest: dict):
        t = manifest["tokenizer"]
        path = Path(bundle) / t["dir"] / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers error text is all we get
            raise LsaqRuntimeError(f"{path}: cannot be read as a tokenizer ({e})") from None
        self.bos_id = t.get("bos_token_id")
        self.add_bos = bool(t["add_bos_token"]) and self.bos_id is not None
        self.eos_ids = frozenset(t["eos_token_ids"])
        self.chat_template = t.get("chat_template")

    def encode(self, text: str) -> list[int]:
        # The manifest, not the tokenizer.json post-processor, decides about BOS; special tokens
        # written in the text (e.g. by a chat template) are still recognised.
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tokenizer.id_to_token(token_id) or "")

    def apply_chat_template(self, prompt: str | list[dict]) -> str:
        if not self.chat_template:
            raise LsaqRuntimeError("this bundle has no chat template (tokenizer.chat_template); "
                                   "run without --chat")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(msg)

        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        eos = next(iter(sorted(self.eos_ids)), None)
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=self.token_text(self.bos_id), eos_token=self.token_text(eos))
        except TemplateError as e:
            raise LsaqRuntimeError(f"the bundle's chat template failed: {e}") from None


class StreamDecoder:
    """Turns token ids into text pieces as they arrive.

    A BPE token can end in the middle of a UTF-8 character, and some tokenizers change the text
    of earlier tokens (leading-space rules), so we decode a short window of recent tokens and
    emit only what is new and complete (no trailing U+FFFD)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.start = 0   # window start: tokens before it are settled
        self.done = 0    # tokens whose text was emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.codec.decode(self.ids[self.start:self.done])
        now = self.codec.decode(self.ids[self.start:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.start, self.done = self.done, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.codec.decode(self.ids[self.start:self.done])
        now = self.codec.decode(self.ids[self.start:])
        self.start = self.done = len(self.ids)
        return now[len(before):]
