"""User-facing errors: `lsaq-run` prints the message as one line (no traceback) and exits 2."""

from __future__ import annotations

import re


class LsaqRuntimeError(Exception):
    """Something wrong with the bundle, the arguments or the device, phrased as what to do."""


class NoVariantFits(LsaqRuntimeError):
    """No variant's memory need fits the free memory; carries the decision for display."""

    def __init__(self, message: str, decision=None):
        super().__init__(message)
        self.decision = decision


class BundleChanged(LsaqRuntimeError):
    """The bundle folder no longer holds the bundle this process launched with."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (libraries' messages can run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


# C0 controls (but tab and newline), DEL, C1 controls, and the bidirectional overrides that can
# make a terminal show other text than the bytes say.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str, newlines: bool = True) -> str:
    """`text` with terminal control characters written as escapes (\\x1b, \\u202e): strings from
    a bundle (model names, paths, generated text) must not drive the user's terminal."""
    out = _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))
    return out if newlines else out.replace("\n", "\\n").replace("\t", "\\t")
