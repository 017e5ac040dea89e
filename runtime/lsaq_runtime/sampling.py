"""Next-token choice from one row of logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import math

import numpy as np

from .errors import LsaqRuntimeError

# Below this a temperature is a mistake, not a setting: dividing float32 logits by it leaves
# only the most likely token (or, near 1e-308, overflows to NaN probabilities). 0 is greedy.
MIN_TEMPERATURE = 1e-5
MAX_SEED = 2**64 - 1   # numpy's generators take seeds in [0, 2**64)


class Sampler:
    """temperature 0 means greedy (argmax); otherwise sample with a seeded numpy Generator."""

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None):
        if not math.isfinite(temperature) or temperature < 0:
            raise LsaqRuntimeError(f"temperature must be a number >= 0 (got {temperature})")
        if 0 < temperature < MIN_TEMPERATURE:
            raise LsaqRuntimeError(f"temperature {temperature:g} is too small to sample with "
                                   f"(below {MIN_TEMPERATURE:g} only the most likely token is "
                                   "left); use 0 for greedy decoding")
        if top_k < 0:
            raise LsaqRuntimeError(f"top-k must be >= 0 (got {top_k}); 0 disables it")
        if not 0 < top_p <= 1:
            raise LsaqRuntimeError(f"top-p must be in (0, 1] (got {top_p})")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed <= MAX_SEED):
            raise LsaqRuntimeError(f"seed must be an integer from 0 to 2**64-1 (got {seed})")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def __call__(self, logits: np.ndarray) -> int:
        if not np.isfinite(logits).all():
            raise LsaqRuntimeError("the model computed NaN or infinite logits: its weights are "
                                   "damaged or not finite; run `lsaq-run verify` or rebuild")
        if self.greedy:
            return int(np.argmax(logits))
        # the largest logit subtracted first: every z is <= 0, so no temperature overflows
        z = (logits.astype(np.float64) - float(np.max(logits))) / self.temperature
        ids = np.arange(z.shape[-1])
        if 0 < self.top_k < z.shape[-1]:
            ids = np.argpartition(-z, self.top_k - 1)[: self.top_k]
        z = z[ids]
        order = np.argsort(-z, kind="stable")  # descending, deterministic for ties
        ids, z = ids[order], z[order]
        p = np.exp(z - z[0])
        p /= p.sum()
        if self.top_p < 1.0:
            # smallest prefix whose mass reaches top_p (always at least the best token)
            keep = int(np.searchsorted(np.cumsum(p), self.top_p) + 1)
            ids, p = ids[:keep], p[:keep] / p[:keep].sum()
        return int(ids[self.rng.choice(len(ids), p=p)])
