"""Stage 3: precision plans. From a layer order (least important first) to one plan per variant.

INT8 everywhere, then INT4 on the n least important layers (the paper's strategy). A ladder is
the list of plans a bundle ships, most precise first — the order the runtime walks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LsaqError

BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
PAPER_FRACTIONS = (0.25, 0.50, 0.75)


@dataclass(frozen=True)
class Plan:
    name: str
    precisions: tuple[str, ...]           # one per decoder layer

    @property
    def counts(self) -> dict[str, int]:
        return {p: self.precisions.count(p) for p in ("fp16", "int8", "int4")}

    @property
    def int4_layers(self) -> list[int]:
        return [i for i, p in enumerate(self.precisions) if p == "int4"]

    def avg_bits_nominal(self, layer_params: list[int] | None = None) -> float:
        """Bits per decoder-linear weight, scales ignored (the paper's 8/7/6/5/4 figures)."""
        w = layer_params or [1] * len(self.precisions)
        return sum(BITS[p] * n for p, n in zip(self.precisions, w)) / sum(w)


def avg_bits_real(layer_bytes: list[int], layer_params: list[int]) -> float:
    """Bits per decoder-linear weight from the bytes actually stored (scales included)."""
    return 8.0 * sum(layer_bytes) / sum(layer_params)


def _validate_order(order: list[int], num_layers: int) -> None:
    if sorted(order) != list(range(num_layers)):
        raise LsaqError(f"layer order must be a permutation of 0..{num_layers - 1}; "
                        f"got {len(order)} entries — do the scores belong to this model?")


def mix_plan(order: list[int], n_int4: int) -> Plan:
    """INT8 everywhere, INT4 on the n_int4 least important layers."""
    L = len(order)
    low = set(order[:n_int4])
    prec = tuple("int4" if i in low else "int8" for i in range(L))
    if n_int4 == 0:
        return Plan("int8", prec)
    if n_int4 == L:
        return Plan("int4", prec)
    return Plan(f"int4x{n_int4:0{len(str(L))}d}", prec)


def paper_counts(num_layers: int) -> list[int]:
    """INT4 layer counts for 25/50/75%: round half up, so 30 layers give 8, 15, 23."""
    return [math.floor(f * num_layers + 0.5) for f in PAPER_FRACTIONS]


def ladder(order: list[int], kind: str = "full") -> list[Plan]:
    """Plans most precise first. 'paper': FP16, INT8, INT4 on 25/50/75% and all layers.
    'full': FP16, INT8, then INT4 on the n least important layers for every n = 1..L."""
    L = len(order)
    _validate_order(order, L)
    if kind == "paper":
        counts = sorted(set(c for c in paper_counts(L) if 0 < c < L)) + [L]
    elif kind == "full":
        counts = list(range(1, L + 1))
    else:
        raise LsaqError(f"unknown ladder {kind!r}; use 'full' or 'paper'")
    return [Plan("fp16", ("fp16",) * L), mix_plan(order, 0)] + [mix_plan(order, n) for n in counts]
