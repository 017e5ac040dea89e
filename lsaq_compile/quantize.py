"""Stage 2: weight quantizers. One small handler per scheme, all producing a `QuantizedTensor`.

Output is already in the layout ONNX Runtime's `com.microsoft::MatMulNBits` reads, so the store
holds exactly the bytes the kernel uses:
  packed  uint8 [N, n_blocks, block_size * bits / 8]  (4-bit: element 2j in the low nibble)
  scales  float16 [N, n_blocks]
  zero_points (asymmetric only) uint8 [N, ceil(n_blocks * bits / 8)]
Symmetric schemes store q + 2^(bits-1) and leave zero points out: MatMulNBits then implies
8 (4-bit) or 128 (8-bit). Weights use the Hugging Face layout W[N_out, K_in].

Clipping (`clip`): round to nearest spends its range on the largest weight of a row or group.
"mse" shrinks that range by the ratio r in CLIP_RATIOS that minimises the squared error of the
dequantized weights (fp16 scales and integer zero points, exactly as the kernel computes);
"mse-act" weights each input feature's error by the mean x^2 of the activations it multiplies
(the AWQ / llama.cpp imatrix idea), i.e. the error of x @ W.T on calibration inputs, diagonally.
No gradients, no calibration of the weights themselves: one grid search per row or group.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import LsaqError

MATMULNBITS_BLOCKS = (256, 128, 64, 32, 16)  # the only block sizes the kernel accepts
CLIPS = ("none", "mse", "mse-act")
# Range ratios the clipping search tries, 1.0 first: r = 1 is round to nearest itself and ties
# keep the first, so the search never ends with a larger (weighted) error than RTN.
CLIP_RATIOS = np.round(np.arange(1.0, 0.495, -0.02), 2).astype(np.float32)   # 1.00 ... 0.50
# elements per search step (numpy's and torch's): Python holds the GIL between their calls, so
# steps must be long enough for threads quantizing other rows to run beside it (numpy, on the
# AVX-512 CPU: 2^15: 2 threads 1.2x faster than one; 2^19: 2.5x, and one thread is faster too)
_CHUNK = 1 << 19
# a weight of at least this many elements is quantized by row ranges on every usable CPU (rows
# are independent: the same bytes as one range); below it a thread pool costs more than it saves
_PARALLEL_MIN = 1 << 21
# and no range is longer than this many elements: each is made float32 alone, so a 128k-row
# token table (8.8 GiB of float32 copy and temporaries at Llama 3's vocabulary) never is whole
_RANGE_MAX = 1 << 24
# the weighted search runs in torch for groups up to this size (the group's sum is one add a
# feature; a per-channel row of thousands of features keeps numpy's einsum)
_WEIGHTED_GS_MAX = 128


@dataclass(frozen=True)
class QuantScheme:
    """How one precision is quantized. kind: 'channel' (the paper) or 'group'."""

    bits: int
    kind: str = "channel"
    group_size: int | None = None     # group kind only: 32, 64 or 128
    symmetric: bool = True
    # channel kind: the MatMulNBits block that carries the row's scale (None = the largest that
    # divides K). It does not change the weights; at accuracy_level 4 it is also the block over
    # which ONNX Runtime quantizes activations, so a small block keeps that step accurate.
    block_size: int | None = None
    clip: str = "none"                # "none" (RTN) | "mse" | "mse-act": see the module docstring

    @property
    def name(self) -> str:
        if self.kind == "channel":
            base = f"int{self.bits}-channel-sym"
        else:
            base = f"int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"
        return base if self.clip == "none" else f"{base}-{self.clip}"


@dataclass
class QuantizedTensor:
    scheme: QuantScheme
    n: int                     # output channels (rows of the HF weight)
    k: int                     # input features
    block_size: int            # MatMulNBits block; per-channel repeats the row scale per block
    packed: np.ndarray
    scales: np.ndarray         # float16 [n, n_blocks]
    zero_points: np.ndarray | None = None

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    @property
    def nbytes(self) -> int:
        """Exact bytes stored (packed data, fp16 scales, zero points)."""
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return self.packed.nbytes + self.scales.nbytes + zp

    def codes(self) -> np.ndarray:
        """Unsigned codes [n, n_blocks * block_size] (padding included)."""
        if self.bits == 8:
            return self.packed.reshape(self.n, -1)
        lo = self.packed & 0x0F
        hi = self.packed >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.n, -1)

    def zero_point_values(self) -> np.ndarray:
        """Zero point per block [n, n_blocks] as float32."""
        if self.zero_points is None:
            return np.full((self.n, self.n_blocks), 2 ** (self.bits - 1), np.float32)
        zp = self.zero_points
        if self.bits == 4:
            zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(self.n, -1)
        return zp[:, : self.n_blocks].astype(np.float32)

    def rows(self, a: int, b: int) -> "QuantizedTensor":
        """Rows [a, b) as their own tensor (copied out: the arrays may be a memory map). Every
        row is quantized alone, so this is exactly those rows quantized."""
        b = min(b, self.n)
        zp = None if self.zero_points is None else np.array(self.zero_points[a:b])
        return QuantizedTensor(self.scheme, b - a, self.k, self.block_size,
                               np.array(self.packed[a:b]), np.array(self.scales[a:b]), zp)

    def dequantize(self) -> np.ndarray:
        """float32 [n, k]: exactly what the kernel computes with (fp16 scales included)."""
        c = self.codes().astype(np.float32).reshape(self.n, self.n_blocks, self.block_size)
        w = (c - self.zero_point_values()[..., None]) * self.scales.astype(np.float32)[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


# torch: the whole-plan passes, streamed quality and the tables' rows dequantize many layers
def dequantize_torch(qt: QuantizedTensor):
    """float32 [n, k]: QuantizedTensor.dequantize in torch, bit-identical ((code - zero point)
    is an exact small integer, times the fp16 scale one rounding) but multi-threaded; at 7B
    this was half of a whole-plan pass in single-threaded numpy."""
    import torch

    p = torch.from_numpy(qt.packed)
    c = p if qt.bits == 8 else torch.stack([p & 0x0F, p >> 4], dim=-1)
    z = 2 ** (qt.bits - 1)
    if qt.zero_points is not None:
        z = torch.from_numpy(qt.zero_points)
        if qt.bits == 4:
            z = torch.stack([z & 0x0F, z >> 4], dim=-1).reshape(qt.n, -1)
        z = z[:, :qt.n_blocks]
    return dequantize_blocks(c.reshape(qt.n, qt.n_blocks, qt.block_size), z, qt.scales, qt.k)


def dequantize_blocks(codes, zero, scales: np.ndarray, k: int):
    """float32 [n, k] (a view past a padded K) of unsigned codes [n, n_blocks, block]: (code -
    zero point) * fp16 scale per block, the kernels' arithmetic in numpy's order. zero: an int
    or a uint8 tensor [n, n_blocks]."""
    import torch

    c = codes.to(torch.float32)
    c.sub_(zero if isinstance(zero, int) else zero.to(torch.float32)[..., None])
    c.mul_(torch.from_numpy(scales).to(torch.float32)[..., None])
    return c.reshape(c.shape[0], -1)[:, :k]


def choose_block(k: int, preferred: int | None = None) -> int:
    """Largest MatMulNBits block that divides K (no padding); else 32 with a zero-padded tail."""
    if preferred is not None:
        if preferred not in MATMULNBITS_BLOCKS:
            raise LsaqError(f"block size {preferred} not accepted by MatMulNBits; use one of "
                            f"{MATMULNBITS_BLOCKS}")
        return preferred
    for b in MATMULNBITS_BLOCKS:
        if k % b == 0:
            return b
    return 32


def _fp16_scale_up(scale: np.ndarray) -> np.ndarray:
    """Round fp32 scales to fp16 without going below: a smaller scale would push max|w|/scale
    past qmax and clipping would break the half-step error bound."""
    s16 = scale.astype(np.float16)
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    tiny = np.float16(2.0 ** -24)  # all-zero rows: any positive scale works
    return np.where(s16 > 0, s16, tiny).astype(np.float16)


def _codes(x: np.ndarray, scale: np.ndarray, lo, hi, zp: np.ndarray | None = None,
           offset: int = 0) -> np.ndarray:
    """np.clip(np.rint(x / scale) (+ zp), lo, hi) + offset, each step in one buffer: fresh
    weight-sized temporaries were faulted in page by page, several times the arithmetic."""
    q = np.divide(x, scale)
    np.rint(q, out=q)
    if zp is not None:
        np.add(q, zp, out=q)
    np.clip(q, lo, hi, out=q)
    if offset:
        q += offset
    return q


def _pack(codes: np.ndarray, bits: int, n: int, block: int) -> np.ndarray:
    codes = codes.astype(np.uint8).reshape(n, -1, block)
    if bits == 8:
        return np.ascontiguousarray(codes)
    if bits == 4:
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))
    raise LsaqError(f"{bits}-bit packing is not supported (4 or 8)")


def _pad_k(w: np.ndarray, block: int) -> np.ndarray:
    pad = (-w.shape[1]) % block
    return np.pad(w, ((0, 0), (0, pad))) if pad else w


def _check_act(act: np.ndarray | None, clip: str, k: int) -> np.ndarray | None:
    """The per-input-feature error weights the search uses (None: unweighted)."""
    if clip not in CLIPS:
        raise LsaqError(f"unknown clip {clip!r}; use one of {', '.join(CLIPS)}")
    if clip != "mse-act":
        return None
    if act is None:
        raise LsaqError("clip 'mse-act' needs activation statistics (mean x^2 per input "
                        "feature of each linear, from calibration text); none were given")
    act = np.asarray(act, dtype=np.float32)
    if act.shape != (k,) or not np.all(np.isfinite(act)) or act.min() < 0:
        raise LsaqError(f"activation statistics must be {k} finite values >= 0 "
                        f"(got shape {act.shape})")
    return act


def _weighted_sq(d: np.ndarray, act: np.ndarray | None) -> np.ndarray:
    """sum over the last axis of act * d^2: d [n, nb, gs], act [nb, gs] or None."""
    if act is None:
        return np.einsum("nbg,nbg->nb", d, d)
    return np.einsum("nbg,nbg,bg->nb", d, d, act, optimize=False)


def _search(g: np.ndarray, error) -> np.ndarray:
    """Ratio [n, nb] from CLIP_RATIOS with the least error(rows, r, out) per (row, group).

    g [n, nb, gs] float32; error(rows: slice, r, out) -> [len(rows), nb] (weighted) squared
    error of that ratio's dequantized weights, computed in `out` (float32, g[rows]'s shape).
    Works on a few rows at a time, so every candidate's temporaries stay in cache (the grid is
    scanned once per chunk), and in one scratch buffer: a fresh 2 MB temporary per numpy call
    was returned to the kernel and faulted in again, as much system time as the arithmetic."""
    n, nb, gs = g.shape
    best = np.ones((n, nb), np.float32)
    step = max(1, _CHUNK // (nb * gs))
    buf = np.empty((min(n, step), nb, gs), np.float32)
    for a in range(0, n, step):
        rows = slice(a, min(n, a + step))
        out = buf[: rows.stop - a]
        best_err = error(rows, CLIP_RATIOS[0], out)        # r = 1: round to nearest
        for r in CLIP_RATIOS[1:]:
            err = error(rows, r, out)
            better = err < best_err                        # strict: ties keep the larger range
            best_err = np.where(better, err, best_err)
            best[rows] = np.where(better, r, best[rows])
    return best


def _search_weighted(g: np.ndarray, act: np.ndarray, levels: int, lo: np.ndarray | None,
                     hi: np.ndarray) -> np.ndarray:
    """`_search` of the activation-weighted error of a group scheme (small gs), in torch: the
    same ratios bit for bit, faster (numpy's float32 divide and its three-operand einsum were
    most of a 7B build's quantization; torch's kernels release the GIL): a 7B layer's INT4 on
    2 AVX2 cores 15.7 -> 10.1 s, benchmarks/bench_quantize.py.

    Symmetric when lo is None (hi = max|w|, levels = qmax), else asymmetric over [lo, hi].
    Exactness: every step is one IEEE float32 operation as in the numpy expressions (division,
    round half to even, fp16 rounding up by one ulp through the bits), and the weighted sum
    is taken in einsum's order for three operands, ((d * d) * act) added left to right over
    the group, which is why the chunk is laid out [gs, rows, nb]: one contiguous add a
    feature. test_in_place_search_chooses_what_the_plain_expressions_choose holds it to the
    einsum."""
    import torch

    n, nb, gs = g.shape
    G, HI = torch.from_numpy(g), torch.from_numpy(hi)
    LO = None if lo is None else torch.from_numpy(lo)
    wt = torch.from_numpy(np.ascontiguousarray(act.T)).reshape(gs, 1, nb)
    R = torch.from_numpy(CLIP_RATIOS).reshape(-1, 1, 1)
    tiny = torch.tensor(2.0 ** -24, dtype=torch.float16)
    best = torch.ones((n, nb), dtype=torch.float32)
    step = max(1, _CHUNK // (nb * gs))
    buf = torch.empty(min(n, step) * nb * gs, dtype=torch.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        gt = G[a:b].permute(2, 0, 1).contiguous()                 # [gs, rows, nb]
        d = buf[: gt.numel()].view(gt.shape)
        # every ratio's fp16 scale (and zero point) at once, [ratios, rows, nb]
        h = HI[a:b] * R
        if LO is None:
            raw = h / levels
        else:
            lr = LO[a:b] * R
            raw = (h - lr) / levels
        s16 = raw.half()                                           # _fp16_scale_up
        s16 = (s16.view(torch.int16) + (s16.float() < raw)).view(torch.float16)
        S = torch.where(s16 > 0, s16, tiny).float()
        if LO is not None:
            # clip(q + zp, 0, levels) - zp == clip(q, -zp, levels - zp): small integers, exact
            ZP = torch.clamp(torch.round(-lr / S), 0, levels)
            QLO, QHI = -ZP, levels - ZP
        acc, best_err = torch.empty((b - a, nb), dtype=torch.float32), None
        for i, r in enumerate(R[:, 0, 0]):
            s = S[i]
            torch.div(gt, s, out=d)
            d.round_()
            if LO is None:
                d.clamp_(-levels, levels)
            else:
                torch.clamp(d, QLO[i], QHI[i], out=d)
            d.mul_(s).sub_(gt)
            _weighted_sq_t(d, wt, acc)
            if best_err is None:
                best_err = acc.clone()                             # r = 1: round to nearest
                continue
            better = acc < best_err                                # strict: ties keep the larger
            best_err = torch.where(better, acc, best_err)
            best[a:b].masked_fill_(better, r)
    return best.numpy()


def _weighted_sq_t(d, wt, out):
    """_weighted_sq(d, act) of d laid out [gs, rows, nb] (torch, wt = act [gs, 1, nb]) into
    out [rows, nb], bit for bit: numpy's three-operand einsum multiplies (d * d) * act and adds
    the group's terms left to right (a pairwise sum, torch's or numpy's, rounds differently).
    d is overwritten."""
    d.mul_(d).mul_(wt)
    out.copy_(d[0])
    for j in range(1, d.shape[0]):
        out.add_(d[j])
    return out


def _sym_range(g: np.ndarray, qmax: int, clip: str, act: np.ndarray | None) -> np.ndarray:
    """max|w| per (row, group) [n, nb], shrunk by the searched ratio unless clip is 'none'."""
    amax = np.abs(g).max(axis=2)
    if clip == "none":
        return amax
    if _weighted_in_torch(g.shape[2], act):
        return amax * _search_weighted(g, act, qmax, None, amax)

    def error(rows, r, d):
        # np.clip(np.rint(gc / s), -qmax, qmax) * s - gc, each step in place
        gc = g[rows]
        s = _fp16_scale_up(amax[rows] * r / qmax).astype(np.float32)[..., None]
        np.divide(gc, s, out=d)
        np.rint(d, out=d)
        np.clip(d, -qmax, qmax, out=d)
        np.multiply(d, s, out=d)
        np.subtract(d, gc, out=d)
        return _weighted_sq(d, act)

    return amax * _search(g, error)


def _asym_range(g: np.ndarray, levels: int, clip: str, act: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) per (row, group), each including 0; both scaled by the searched ratio: shrinking
    them together keeps zero where RTN puts it relative to the range."""
    lo = np.minimum(g.min(axis=2), 0.0)
    hi = np.maximum(g.max(axis=2), 0.0)
    if clip == "none":
        return lo, hi
    if _weighted_in_torch(g.shape[2], act):
        ratio = _search_weighted(g, act, levels, lo, hi)
        return lo * ratio, hi * ratio

    def error(rows, r, d):
        # (np.clip(np.rint(gc / s) + zp, 0, levels) - zp) * s - gc, each step in place
        gc = g[rows]
        s, zp = _asym_scale_zp(lo[rows] * r, hi[rows] * r, levels)
        s, zp = s.astype(np.float32)[..., None], zp.astype(np.float32)[..., None]
        np.divide(gc, s, out=d)
        np.rint(d, out=d)
        np.add(d, zp, out=d)
        np.clip(d, 0, levels, out=d)
        np.subtract(d, zp, out=d)
        np.multiply(d, s, out=d)
        np.subtract(d, gc, out=d)
        return _weighted_sq(d, act)

    ratio = _search(g, error)
    return lo * ratio, hi * ratio


def _asym_scale_zp(lo: np.ndarray, hi: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scale and integer zero point of the range [lo, hi] (lo <= 0 <= hi)."""
    scale = _fp16_scale_up((hi - lo) / levels)
    zp = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, levels).astype(np.uint8)
    return scale, zp


def quantize_channel(w: np.ndarray, bits: int, block: int | None = None, clip: str = "none",
                     act: np.ndarray | None = None) -> QuantizedTensor:
    """Per output channel, symmetric, round to nearest: s = max|w_row| / qmax, q = round(w / s)
    (max|w_row| shrunk by the clipping search when clip is not 'none').

    The row's scale is repeated in every MatMulNBits block of the row, which is exact."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    act = _check_act(act, clip, k)
    block = choose_block(k, block)
    qmax = 2 ** (bits - 1) - 1
    amax = _sym_range(w[:, None, :], qmax, clip, None if act is None else act[None])[:, 0]
    scale = _fp16_scale_up(amax / qmax)                               # [n]
    s = scale.astype(np.float32)[:, None]
    codes = _pad_k(_codes(w, s, -qmax, qmax, offset=2 ** (bits - 1)), block)   # pad codes = 0.0
    nb = codes.shape[1] // block
    return QuantizedTensor(QuantScheme(bits, "channel", clip=clip), n, k, block,
                           _pack(codes, bits, n, block), np.repeat(scale[:, None], nb, axis=1))


def quantize_group(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True,
                   clip: str = "none", act: np.ndarray | None = None) -> QuantizedTensor:
    """Group-wise round to nearest over `group_size` input features (block == group), over a
    range shrunk per group by the clipping search when clip is not 'none'."""
    if group_size not in (32, 64, 128):
        raise LsaqError(f"group size {group_size} not supported; use 32, 64 or 128")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    act = _check_act(act, clip, k)
    g = _pad_k(w, group_size).reshape(n, -1, group_size)
    nb = g.shape[1]
    if act is not None:
        act = _pad_k(act[None], group_size).reshape(nb, group_size)   # padded features: weight 0
    zp_packed = None
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _fp16_scale_up(_sym_range(g, qmax, clip, act) / qmax)
        q = _codes(g, scale.astype(np.float32)[..., None], -qmax, qmax, offset=2 ** (bits - 1))
    else:
        levels = 2 ** bits - 1
        scale, zp = _asym_scale_zp(*_asym_range(g, levels, clip, act), levels)   # zp [n, nb]
        q = _codes(g, scale.astype(np.float32)[..., None], 0, levels, zp[..., None])
        if k % group_size:
            # padded tail must dequantize to 0: code = zero point
            tail = np.arange(nb * group_size).reshape(nb, group_size) >= k
            q = np.where(tail[None], zp[..., None], q)
        if bits == 4:
            zpp = zp if nb % 2 == 0 else np.pad(zp, ((0, 0), (0, 1)))
            zp_packed = np.ascontiguousarray(zpp[:, 0::2] | (zpp[:, 1::2] << 4))
        else:
            zp_packed = zp
    return QuantizedTensor(QuantScheme(bits, "group", group_size, symmetric, clip=clip), n, k,
                           group_size, _pack(q, bits, n, group_size), scale.astype(np.float16),
                           zp_packed)


def quantize(w: np.ndarray, scheme: QuantScheme, block: int | None = None,
             act: np.ndarray | None = None, workers: int | None = None) -> QuantizedTensor:
    """act: float32 [K], mean x^2 per input feature of this linear's input (clip 'mse-act').
    workers: threads quantizing row ranges (default: the usable CPUs for a large weight; every
    row is quantized alone, so the result is the same bytes whatever the number). w may be
    float16 (a token table): each range is made float32 alone, at most _RANGE_MAX elements."""
    n, k = np.shape(w) if np.ndim(w) == 2 else (0, 0)
    if workers is None:
        workers = _workers() if n * k >= _PARALLEL_MIN else 1
    ranges = max(1, min(n, max(workers, -(-n * k // _RANGE_MAX))))
    with _torch_single_threaded(_searches_in_torch(scheme, act)):
        if ranges == 1:
            return _quantize(w, scheme, block, act)
        cuts = np.linspace(0, n, ranges + 1).astype(int)
        with ThreadPoolExecutor(max(1, min(workers, ranges)),
                                thread_name_prefix="lsaq-quantize") as ex:
            parts = list(ex.map(lambda ab: _quantize(w[ab[0]:ab[1]], scheme, block, act),
                                zip(cuts[:-1], cuts[1:])))
    return _rows_joined(parts)


def _weighted_in_torch(gs: int, act) -> bool:
    """Whether the search of groups of gs features, weighted by act (None: unweighted), runs
    in torch (_search_weighted) rather than numpy."""
    return act is not None and gs <= _WEIGHTED_GS_MAX


def _searches_in_torch(scheme: QuantScheme, act) -> bool:
    return (scheme.clip == "mse-act" and scheme.kind == "group"
            and _weighted_in_torch(scheme.group_size, act))


@contextmanager
def _torch_single_threaded(on: bool):
    """torch's own threads off while the search runs: row ranges are already on every CPU,
    and even alone its 2-thread kernels were slower on the search's 2 MB steps (2.5 s against
    2.3 s a 45M-weight linear). No result depends on it; the caller's setting comes back."""
    if not on:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _workers() -> int:
    from lsaq_runtime.probe import usable_cpus

    return usable_cpus()


def _rows_joined(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """One QuantizedTensor of row ranges quantized alone, in order."""
    a = parts[0]
    zp = (None if a.zero_points is None
          else np.concatenate([p.zero_points for p in parts]))
    return QuantizedTensor(a.scheme, sum(p.n for p in parts), a.k, a.block_size,
                           np.concatenate([p.packed for p in parts]),
                           np.concatenate([p.scales for p in parts]), zp)


def _quantize(w: np.ndarray, scheme: QuantScheme, block: int | None,
              act: np.ndarray | None) -> QuantizedTensor:
    if scheme.kind == "channel":
        return quantize_channel(w, scheme.bits, block if block is not None else scheme.block_size,
                                scheme.clip, act)
    if scheme.kind == "group":
        return quantize_group(w, scheme.bits, scheme.group_size, scheme.symmetric, scheme.clip, act)
    raise LsaqError(f"unknown quantization scheme {scheme.kind!r}; use 'channel' or 'group'")


def schemes_for(kind: str, group_size: int | None = None, symmetric: bool = True,
                block_size: int | None = None, clip: str = "none") -> dict[str, QuantScheme]:
    """The INT8 and INT4 schemes of a quantization setting. INT8 is always per channel (the
    paper); `kind` chooses INT4's scheme. block_size: see QuantScheme (per-channel only).
    clip: INT4's clipping search (INT8 stays round to nearest)."""
    if block_size is not None:
        choose_block(1, block_size)  # raises for a block MatMulNBits does not accept
    if clip not in CLIPS:
        raise LsaqError(f"unknown clip {clip!r}; use one of {', '.join(CLIPS)}")
    int8 = QuantScheme(8, "channel", block_size=block_size)
    if kind == "channel":
        return {"int8": int8, "int4": QuantScheme(4, "channel", block_size=block_size, clip=clip)}
    if kind == "group":
        return {"int8": int8, "int4": QuantScheme(4, "group", group_size or 32, symmetric, clip=clip)}
    raise LsaqError(f"unknown quantization scheme {kind!r}; use 'channel' or 'group'")


@dataclass(frozen=True)
class QuantSettings:
    """A build's quantization settings, read once from a profile or a manifest: every caller
    (build, eval's torch reference, study) gets its INT8/INT4 schemes from here."""

    scheme: str = "channel"            # INT4's kind: 'channel' (the paper) or 'group'
    group_size: int | None = None
    symmetric: bool = True
    block_size: int | None = None      # None: the largest MatMulNBits block that divides K
    clip: str = "none"

    @classmethod
    def from_profile(cls, q) -> "QuantSettings":
        """From a profile's [quantization] section (block_size 0 means "choose")."""
        return cls(q.scheme, q.group_size, q.symmetric, q.block_size or None, q.clip)

    @classmethod
    def from_manifest(cls, q: dict | None) -> "QuantSettings":
        """From a manifest's `quantization` record (older bundles leave keys out)."""
        q = q or {}
        return cls(q.get("scheme", "channel"), q.get("group_size"), q.get("symmetric", True),
                   q.get("block_size"), q.get("clip", "none"))

    def schemes(self) -> dict[str, QuantScheme]:
        return schemes_for(self.scheme, self.group_size, self.symmetric, self.block_size,
                           self.clip)


def stored_bytes(n: int, k: int, scheme: QuantScheme) -> int:
    """Exact bytes `quantize` stores for an [n, k] weight (packed codes, fp16 scales, zero
    points), without quantizing it: the ladder's byte budgets are planned from this."""
    block = choose_block(k, scheme.block_size) if scheme.kind == "channel" else scheme.group_size
    nb = -(-k // block)
    total = n * nb * (block * scheme.bits // 8 + 2)
    if scheme.kind == "group" and not scheme.symmetric:
        total += n * -(-nb * scheme.bits // 8)
    return total


# ---------------------------------------------------------------- kept quantizations
def candidate_path(folder: Path, layer: int, name: str, precision: str) -> Path:
    """Where a build keeps decoder layer `layer`'s HF linear `name` quantized at `precision`
    (the fisher estimate makes each once; plan checks, the store and a resumed build read it)."""
    return Path(folder) / f"{layer}.{name}.{precision}.npz"


def save_candidate(path: Path, qt: QuantizedTensor) -> None:
    part = path.with_name(f".{path.name}.part")
    with open(part, "wb") as f:
        np.savez(f, scheme=qt.scheme.name, n=qt.n, k=qt.k, block_size=qt.block_size,
                 packed=qt.packed, scales=qt.scales, has_zp=qt.zero_points is not None,
                 zero_points=qt.zero_points if qt.zero_points is not None
                 else np.zeros(0, np.uint8))
    os.replace(part, path)   # a kill mid-write leaves no half candidate


def load_candidate(path: Path, scheme: QuantScheme) -> QuantizedTensor | None:
    """The kept quantization at `path` if it is whole and of `scheme`; None otherwise."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["scheme"]) != scheme.name:
                return None
            return QuantizedTensor(scheme, int(z["n"]), int(z["k"]), int(z["block_size"]),
                                   z["packed"], z["scales"], z["zero_points"] if z["has_zp"] else None)
    except (OSError, ValueError, KeyError):
        return None


def table_candidate_path(folder: Path, table: str, scheme: QuantScheme) -> Path:
    """Where a build keeps token table `table` ("embed_tokens" or "lm_head") quantized with
    `scheme`: every whole-plan pass walks the head at each precision and the store writes it,
    all from this one quantization (a 128k-row head's clipping search took 150-190 s a pass)."""
    return Path(folder) / f"table.{table}.{scheme.name}.safetensors"


def save_table_candidate(path: Path, parts: list[QuantizedTensor]) -> None:
    """A table quantized by row ranges (in order), as one safetensors file that
    load_table_candidate memory-maps, written whole or not at all and never joined in memory
    (a 128k-row head's INT8 is 0.5 GB)."""
    from .store import SafetensorsWriter

    a = parts[0]
    arrays = {"shape": [np.array([sum(p.n for p in parts), a.k, a.block_size], np.int64)],
              "packed": [p.packed for p in parts], "scales": [p.scales for p in parts]}
    if a.zero_points is not None:
        arrays["zero_points"] = [p.zero_points for p in parts]
    part = path.with_name(f".{path.name}.part")
    with SafetensorsWriter(path.parent, part.name, list(arrays)) as w:
        for name, rows in arrays.items():
            w.add_rows(name, rows)
    os.replace(part, path)


def load_table_candidate(path: Path, scheme: QuantScheme) -> QuantizedTensor | None:
    """The kept table at `path`, memory-mapped (its pages are the file's, which the kernel can
    drop, not the build's memory: 0.8 GB for a 128k-row head's INT8 and INT4), or None if it is
    missing or damaged."""
    from lsaq_runtime.errors import LsaqRuntimeError
    from lsaq_runtime.integrity import safetensors_index

    if not Path(path).is_file():
        return None
    try:
        index = safetensors_index(path)
        arrays = {name: np.memmap(path, dtype=_ST_NP[dtype], mode="r", offset=offset,
                                  shape=tuple(shape))
                  for name, (dtype, shape, offset, _) in index.items()}
        n, k, block = (int(x) for x in arrays["shape"])
        qt = QuantizedTensor(scheme, n, k, block, arrays["packed"], arrays["scales"],
                             arrays.get("zero_points"))
    except (LsaqRuntimeError, OSError, ValueError, KeyError, TypeError):
        return None
    whole = (qt.packed.shape[0] == qt.scales.shape[0] == n and qt.n_blocks == -(-k // block)
             and (qt.zero_points is None) == (scheme.kind == "channel" or scheme.symmetric))
    return qt if whole else None


_ST_NP = {"U8": np.uint8, "F16": np.float16, "I64": np.int64}
