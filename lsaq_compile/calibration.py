"""Calibration text for layer scoring: token windows cut from a UTF-8 text file.

Any UTF-8 text works. The text is tokenized once (no special tokens added) and `samples`
non-overlapping windows are taken at evenly spaced offsets, so the windows cover the whole text
and the same file and settings always give the same windows. Each window is framed as the model
frames a prompt: for a model that expects BOS it is BOS + seq_len - 1 tokens of text.

The default (no file given) must work offline and must not ship a third-party corpus, so it is
built from the Python standard library's own documentation: the docstrings of a fixed list of
pure-Python stdlib modules and their public classes and functions, in a fixed order. That text is
PSF-licensed and present on every Python install. It is deterministic for a given Python version
(a different Python may carry slightly different docstrings, which the fingerprint records). It
is English technical prose, not web text; pass a file (e.g. a C4 sample) to calibrate on text
closer to what the model will see. WikiText test is an evaluation set: never calibrate on it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LsaqError

# Pure-Python modules with long, stable docstrings; C modules carry only one-line docs.
DEFAULT_MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.tasks", "calendar", "collections",
    "configparser", "contextlib", "csv", "dataclasses", "decimal", "difflib", "email.message",
    "enum", "fractions", "ftplib", "functools", "gettext", "heapq", "http.client",
    "http.cookiejar", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "optparse",
    "pathlib", "pickle", "pydoc", "random", "shlex", "shutil", "smtplib", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize", "queue", "sched",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "zipfile",
)
# Bumped whenever the windowing rule changes, so old fingerprints no longer match.
_WINDOWING = "evenly-spaced-non-overlapping-v1"


@dataclass
class Calibration:
    windows: np.ndarray  # int64 [samples, seq_len] token ids
    source: str          # file path, or "builtin:python-X.Y-stdlib-docstrings"
    sha256: str          # of the text and the windowing settings
    samples: int
    seq_len: int
    # Windows disjoint from `windows` (in the gaps between them) for measuring variants: they
    # do not change `windows` nor the fingerprint.
    held_out: np.ndarray | None = None
    prefix: tuple = ()   # what starts every window: (BOS,) for a model that expects one


def load_tokenizer(source):
    """The model's text codec (the runtime's `TextCodec` over the tokenizer the bundle will
    ship): `encode_text` for plain text, `frame` to start a sequence as the model expects."""
    try:
        return source.codec()
    except LsaqError:
        raise
    except Exception as e:  # transformers raises many types for missing/broken tokenizer files
        raise LsaqError(f"{source.path}: cannot load the model's tokenizer "
                        f"({type(e).__name__}: {e}); an HF folder needs tokenizer.json "
                        "(or tokenizer.model)") from None


def default_text() -> str:
    """Docstrings of DEFAULT_MODULES and their public members, in a fixed order."""
    parts = []
    for name in DEFAULT_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a future Python may drop a module; the fingerprint records the text
            continue
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue  # re-exported names would repeat text documented elsewhere
            if inspect.isclass(obj) or inspect.isfunction(obj):
                parts.append(inspect.getdoc(obj) or "")
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    m = vars(obj)[meth]
                    if not meth.startswith("_") and inspect.isfunction(m):
                        parts.append(inspect.getdoc(m) or "")
    return "\n\n".join(p for p in parts if p)


def _read_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.is_file():
        raise LsaqError(f"{p}: calibration file not found; give a UTF-8 text file "
                        "(or leave it out to use the built-in text)")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LsaqError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start}); convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {p.name} > {p.stem}.utf8.txt`") from None


def load_calibration(path: str | os.PathLike | None, tokenizer, samples: int = 32,
                     seq_len: int = 256, held_out: int = 0) -> Calibration:
    """Cut `samples` windows of `seq_len` tokens from a text file (None: the built-in text).

    `tokenizer` is the model's codec (`load_tokenizer`): each window starts as the model's
    sequences do, so for a model that expects BOS a window is BOS + seq_len - 1 tokens of text
    (without it such a model's baseline is broken: a real Gemma 3 scores perplexity 350
    instead of 19 on such windows, and quantization noise then *lowers* it).
    """
    if samples < 1 or seq_len < 2:
        raise LsaqError(f"calibration needs samples >= 1 and seq_len >= 2 "
                        f"(got {samples}, {seq_len})")
    if path is None:
        text = default_text()
        v = sys.version_info
        source = f"builtin:python-{v.major}.{v.minor}-stdlib-docstrings"
        if not text:
            raise LsaqError("the built-in calibration text is empty: Python runs with -OO, which "
                            "strips docstrings; run without -OO or pass a calibration file")
    else:
        text = _read_text(path)
        source = str(path)
    prefix = list(tokenizer.prefix)
    span = seq_len - len(prefix)          # text tokens per window
    if span < 1:
        raise LsaqError(f"calibration seq_len {seq_len} leaves no room for text after BOS")
    ids = np.asarray(tokenizer.encode_text(text), dtype=np.int64)
    need = samples * span
    if len(ids) < need:
        raise LsaqError(
            f"{source}: {len(ids)} tokens, but {samples} windows x {span} tokens need {need}; "
            f"use fewer samples (at most {len(ids) // span} at this seq_len), a shorter seq_len "
            f"(at most {len(ids) // samples + len(prefix)}), or a longer text")
    # Evenly spaced starts: stride >= span, so windows never overlap and span the whole text.
    stride = len(ids) // samples
    windows = _framed([ids[j * stride: j * stride + span] for j in range(samples)], prefix)
    h = hashlib.sha256(text.encode("utf-8"))
    h.update(f"|{_WINDOWING}|samples={samples}|seq_len={seq_len}".encode())
    if prefix:  # BOS-framed windows are other windows: a fingerprint must not match unframed ones
        h.update(f"|prefix={prefix}".encode())
    return Calibration(windows=windows, source=source, sha256=h.hexdigest(), samples=samples,
                       seq_len=seq_len,
                       held_out=_gap_windows(ids, samples, span, held_out, source, prefix),
                       prefix=tuple(int(t) for t in prefix))


def _framed(chunks: list[np.ndarray], prefix: list[int]) -> np.ndarray:
    """[len(chunks), len(prefix) + chunk length] int64: each chunk after the model's prefix."""
    head = np.asarray(prefix, np.int64)
    return np.stack([np.concatenate([head, c]) for c in chunks]).astype(np.int64)


def _gap_windows(ids: np.ndarray, samples: int, span: int, count: int, source: str,
                 prefix: list[int]):
    """`count` windows from the gaps after each calibration window, round robin over the gaps."""
    if not count:
        return None
    stride = len(ids) // samples
    per_gap = (stride - span) // span
    if per_gap * samples < count:
        raise LsaqError(f"{source}: {len(ids)} tokens leave room for {per_gap * samples} held-out "
                        f"windows of {span + len(prefix)} beside {samples} calibration windows, "
                        f"not {count}; use fewer build.quality_samples, a shorter seq_len or a "
                        "longer text")
    starts = [g * stride + span * (1 + q // samples)
              for q in range(count) for g in [q % samples]]
    return _framed([ids[s:s + span] for s in starts], prefix)
