"""Byte sizes as people write them: '6GiB' (binary), '6GB' (decimal), '512 MiB', '1.5GB', '1000'."""

from __future__ import annotations

import re
from fractions import Fraction

from .errors import LsaqRuntimeError

# More memory than any device has (1 EiB): a larger size is a typo, and unbounded numbers would
# overflow the float arithmetic of plans.
MAX_SIZE = 1 << 60

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in `text`. Units are case-insensitive; KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024."""
    if isinstance(text, bool):
        raise LsaqRuntimeError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        if text != text or text < 0:
            raise LsaqRuntimeError(f"a size cannot be negative or NaN: {text}")
        return _bounded(text, str(text))
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
        raise LsaqRuntimeError(
            f"not a size: {shown!r}; write a number with an optional unit B, KB, MB, GB, TB "
            "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 6GiB or 512MB")
    # exact arithmetic: a float would round '1' followed by 400 zeros to infinity
    return _bounded(Fraction(m.group(1)) * _UNITS[unit], str(text).strip())


def _bounded(value, text: str) -> int:
    if value > MAX_SIZE:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise LsaqRuntimeError(f"size {shown} is more than any device has (over 1 EiB); "
                               "check the number and its unit")
    return int(value)


def format_size(n: int | float) -> str:
    """Binary units, three significant digits: 1.50 GiB, 512 MiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            # three significant digits, but never as an exponent (1010 MiB, not 1.01e+03)
            return f"{n:.3g} {unit}" if abs(n) < 999.5 else f"{n:,.0f} {unit}"
        n /= 1024
