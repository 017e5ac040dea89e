"""Text in and out: the bundle's tokenizer, its chat template, and streaming detokenization."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from . import rustguard
from .errors import LsaqRuntimeError
from .integrity import bundle_path
from .manifest import tokenizer_file


def check_text(text: str, what: str) -> None:
    """Text must be Unicode that UTF-8 can carry: a lone UTF-16 surrogate (JSON's "\\ud800", or
    undecodable bytes of a command line) is not text, and the tokenizer cannot take it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        raise LsaqRuntimeError(f"{what} holds {ch!r} at character {e.start}, a lone UTF-16 "
                               "surrogate that is not text; send valid Unicode") from None


class TextCodec:
    """The bundle's tokenizer and how the model frames a sequence (BOS first or not).

    Every place that turns text into token ids for this model uses one of these: generation,
    serving, and on the compile side calibration, build-time quality and evaluation, so a
    window scored at build time starts the way a prompt does at run time."""

    def __init__(self, bundle: Path, manifest: dict):
        path = bundle_path(Path(bundle), tokenizer_file(manifest), "manifest.json")
        self._init(path, manifest["tokenizer"], manifest["model"]["vocab_size"])

    @classmethod
    def from_files(cls, tokenizer_json: Path, facts: dict, vocab_size: int) -> "TextCodec":
        """A codec over a tokenizer.json and the tokenizer facts a manifest would record
        (bos_token_id, add_bos_token, eos_token_ids, chat_template): the compiler's view of the
        tokenizer it is about to ship."""
        codec = cls.__new__(cls)
        codec._init(Path(tokenizer_json), facts, vocab_size)
        return codec

    def _init(self, path: Path, t: dict, vocab_size: int) -> None:
        # the tokenizers error text is all we get; a panic is caught too (rustguard)
        self.tokenizer = rustguard.call(Tokenizer.from_file, str(path),
                                        what=f"{path}: cannot be read as a tokenizer")
        self.vocab_size = vocab_size
        self.bos_id = t.get("bos_token_id")
        self.add_bos = bool(t["add_bos_token"]) and self.bos_id is not None
        self.eos_ids = frozenset(t["eos_token_ids"])
        self.chat_template = t.get("chat_template")

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` alone (no BOS): for cutting a long text into windows."""
        # The manifest, not the tokenizer.json post-processor, decides about BOS; special tokens
        # written in the text (e.g. by a chat template) are still recognised.
        check_text(text, "the prompt")
        ids = rustguard.call(self.tokenizer.encode, text, add_special_tokens=False,
                             what="the bundle's tokenizer failed on the prompt").ids
        bad = next((i for i in ids if i >= self.vocab_size), None)
        if bad is not None:  # the graph's embedding lookup would fail on it
            raise LsaqRuntimeError(f"the bundle's tokenizer produced token id {bad}, outside the "
                                   f"model's vocabulary of {self.vocab_size}; the bundle is damaged")
        return ids

    @property
    def prefix(self) -> list[int]:
        """What the model expects before any text: [BOS] or nothing."""
        return [self.bos_id] if self.add_bos else []

    def frame(self, ids: list[int]) -> list[int]:
        """`ids` as the start of a sequence: BOS first when the model expects one."""
        ids = list(ids)
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: the text, framed as a sequence start."""
        return self.frame(self.encode_text(text))

    def decode(self, ids) -> str:
        return rustguard.call(self.tokenizer.decode, list(ids), skip_special_tokens=True,
                              what="the bundle's tokenizer failed to decode generated tokens")

    def token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (rustguard.call(
            self.tokenizer.id_to_token, token_id, what="the bundle's tokenizer failed") or "")

    def apply_chat_template(self, prompt: str | list[dict]) -> str:
        if not self.chat_template:
            raise LsaqRuntimeError("this bundle has no chat template (tokenizer.chat_template); "
                                   "run without --chat")
        from .chat_template import render

        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and all(
                isinstance(x, dict) and isinstance(x.get("role"), str)
                and isinstance(x.get("content"), str) for x in prompt):
            messages = prompt
        else:
            raise LsaqRuntimeError("chat messages must be a list of {\"role\": str, \"content\": str}")
        eos = next(iter(sorted(self.eos_ids)), None)
        return render(self.chat_template, {
            "messages": messages, "add_generation_prompt": True,
            "bos_token": self.token_text(self.bos_id), "eos_token": self.token_text(eos)})


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
