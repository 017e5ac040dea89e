"""Stage 2: weight quantizers. One small handler per scheme, all producing a `QuantizedTensor`.

Output is already in the layout ONNX Runtime's `com.microsoft::MatMulNBits` reads, so the store
holds exactly the bytes the kernel uses:
  packed  uint8 [N, n_blocks, block_size * bits / 8]  (4-bit: element 2j in the low nibble)
  scales  float16 [N, n_blocks]
  zero_points (asymmetric only) uint8 [N, ceil(n_blocks * bits / 8)]
Symmetric schemes store q + 2^(bits-1) and leave zero points out: MatMulNBits then implies
8 (4-bit) or 128 (8-bit). Weights use the Hugging Face layout W[N_out, K_in].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import LsaqError

MATMULNBITS_BLOCKS = (256, 128, 64, 32, 16)  # the only block sizes the kernel accepts


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

    @property
    def name(self) -> str:
        if self.kind == "channel":
            return f"int{self.bits}-channel-sym"
        return f"int{self.bits}-g{self.group_size}-{'sym' if self.symmetric else 'asym'}"


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

    def dequantize(self) -> np.ndarray:
        """float32 [n, k]: exactly what the kernel computes with (fp16 scales included)."""
        c = self.codes().astype(np.float32).reshape(self.n, self.n_blocks, self.block_size)
        w = (c - self.zero_point_values()[..., None]) * self.scales.astype(np.float32)[..., None]
        return w.reshape(self.n, -1)[:, : self.k]


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


def quantize_channel(w: np.ndarray, bits: int, block: int | None = None) -> QuantizedTensor:
    """Per output channel, symmetric, round to nearest: s = max|w_row| / qmax, q = round(w / s).

    The row's scale is repeated in every MatMulNBits block of the row, which is exact."""
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    block = choose_block(k, block)
    qmax = 2 ** (bits - 1) - 1
    scale = _fp16_scale_up(np.abs(w).max(axis=1) / qmax)            # [n]
    s = scale.astype(np.float32)[:, None]
    q = np.clip(np.rint(w / s), -qmax, qmax)
    codes = _pad_k(q + 2 ** (bits - 1), block)                        # pad codes = zero point = 0.0
    nb = codes.shape[1] // block
    return QuantizedTensor(QuantScheme(bits, "channel"), n, k, block, _pack(codes, bits, n, block),
                           np.repeat(scale[:, None], nb, axis=1))


def quantize_group(w: np.ndarray, bits: int, group_size: int, symmetric: bool = True
                   ) -> QuantizedTensor:
    """Group-wise round to nearest over `group_size` input features (block == group)."""
    if group_size not in (32, 64, 128):
        raise LsaqError(f"group size {group_size} not supported; use 32, 64 or 128")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    g = _pad_k(w, group_size).reshape(n, -1, group_size)
    nb = g.shape[1]
    zp_packed = None
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = _fp16_scale_up(np.abs(g).max(axis=2) / qmax)
        q = np.clip(np.rint(g / scale.astype(np.float32)[..., None]), -qmax, qmax) + 2 ** (bits - 1)
    else:
        levels = 2 ** bits - 1
        lo = np.minimum(g.min(axis=2), 0.0)
        hi = np.maximum(g.max(axis=2), 0.0)
        scale = _fp16_scale_up((hi - lo) / levels)
        s = scale.astype(np.float32)
        zp = np.clip(np.rint(-lo / s), 0, levels).astype(np.uint8)          # [n, nb]
        q = np.clip(np.rint(g / s[..., None]) + zp[..., None], 0, levels)
        if k % group_size:
            # padded tail must dequantize to 0: code = zero point
            tail = np.arange(nb * group_size).reshape(nb, group_size) >= k
            q = np.where(tail[None], zp[..., None], q)
        if bits == 4:
            zpp = zp if nb % 2 == 0 else np.pad(zp, ((0, 0), (0, 1)))
            zp_packed = np.ascontiguousarray(zpp[:, 0::2] | (zpp[:, 1::2] << 4))
        else:
            zp_packed = zp
    return QuantizedTensor(QuantScheme(bits, "group", group_size, symmetric), n, k, group_size,
                           _pack(q, bits, n, group_size), scale.astype(np.float16), zp_packed)


def quantize(w: np.ndarray, scheme: QuantScheme, block: int | None = None) -> QuantizedTensor:
    if scheme.kind == "channel":
        return quantize_channel(w, scheme.bits, block if block is not None else scheme.block_size)
    if scheme.kind == "group":
        return quantize_group(w, scheme.bits, scheme.group_size, scheme.symmetric)
    raise LsaqError(f"unknown quantization scheme {scheme.kind!r}; use 'channel' or 'group'")


def schemes_for(kind: str, group_size: int | None = None, symmetric: bool = True,
                block_size: int | None = None) -> dict[str, QuantScheme]:
    """The INT8 and INT4 schemes of a quantization setting. INT8 is always per channel (the
    paper); `kind` chooses INT4's scheme. block_size: see QuantScheme (per-channel only)."""
    if block_size is not None:
        choose_block(1, block_size)  # raises for a block MatMulNBits does not accept
    int8 = QuantScheme(8, "channel", block_size=block_size)
    if kind == "channel":
        return {"int8": int8, "int4": QuantScheme(4, "channel", block_size=block_size)}
    if kind == "group":
        return {"int8": int8, "int4": QuantScheme(4, "group", group_size or 32, symmetric)}
    raise LsaqError(f"unknown quantization scheme {kind!r}; use 'channel' or 'group'")
