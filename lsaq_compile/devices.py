"""Where the torch stages run: `--device auto|cpu|cuda`, the compute dtype there, the clock
text of progress lines (shared by the exact and the streamed measurements), and float16 <->
float32 casts of numpy arrays done by torch."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from .errors import LsaqError


def _device(device: "str | torch.device") -> torch.device:
    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise LsaqError(f"device {device!r}: use auto, cpu or cuda (cuda:N for the N-th GPU)")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise LsaqError("device cuda: torch sees no CUDA device (a CPU-only torch, or no GPU)")
        n = torch.cuda.device_count()
        if colon and int(index) >= n:
            raise LsaqError(f"device {device}: torch sees {n} CUDA device(s), cuda:0 to "
                            f"cuda:{n - 1}")
    return torch.device(device)


def synchronize(dev: torch.device) -> None:
    """Wait for the GPU's queued work: CUDA kernels run after their launch returns, so a clock
    read without this times the queueing, not the work (a layer's rate and an ETA)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_type(device: str | None) -> str:
    """"cpu" or "cuda": what --device auto|cpu|cuda runs the torch stages on."""
    return _device(device or "cpu").type


def _dtype(dev: torch.device, dtype) -> torch.dtype:
    """float32 on the CPU; float16 on CUDA: it holds the FP16 model's weights exactly (bfloat16
    would round them by about as much as INT8 does), gradients are rescaled per probe so they
    do not underflow, and an activation that overflows stops the run with a message."""
    if dtype is None:
        return torch.float32 if dev.type == "cpu" else torch.float16
    d = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if d not in (torch.float32, torch.float16, torch.bfloat16):
        raise LsaqError(f"dtype {dtype!r}: use float32, float16 or bfloat16")
    return d


# A CPU without bfloat16/float16 matrix instructions (AVX2 only: measured here on an AMD EPYC)
# multiplies them through a scalar fallback, about 200x slower than float32 (0.6 against 123
# GFLOP/s for [128, 4096] x [4096, 1024]); with the instructions (AVX512-BF16, AMX) bfloat16
# ran the estimate about 2.3x faster than float32.
HALF_SLOWDOWN_MAX = 4.0


def cpu_half_slowdown(dtype: str) -> float:
    """How many times slower this CPU multiplies [64, 1024] x [1024, 512] matrices in `dtype`
    than in float32, measured now (best of 3; well under a second where the fallback is
    slow). Measured rather than read from CPU flags: what counts is what torch's kernels do."""
    import time

    d = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 1024, generator=g), torch.randn(1024, 512, generator=g)

    def best(x, y) -> float:
        x @ y   # first call: kernel selection, packing
        out = []
        for _ in range(3):
            t = time.perf_counter()
            x @ y
            out.append(time.perf_counter() - t)
        return max(min(out), 1e-9)

    return best(a.to(d), b.to(d)) / best(a, b)


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# numpy converts between float16 and float32 one element at a time: a 7B layer's linears took
# about 1.5 s of one core each way, on every one of the ~250 layer reads of a default build.
# torch converts with vector instructions on every core. Both round to nearest even (float32 ->
# float16) and widen exactly, so the values are the same bit for bit (tests/compile/test_estimate).
def _tensor(a: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():   # a read-only array (a memory map) is only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(a))


def to_float32(a: np.ndarray) -> np.ndarray:
    """A float32 array of `a`'s values (`a` itself when it is float32 already). Only float16
    goes through torch; other types (a bfloat16 checkpoint's ml_dtypes arrays) through numpy."""
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a
    return _tensor(a).to(torch.float32).numpy() if a.dtype == np.float16 else a.astype(np.float32)


def to_float16(a: np.ndarray) -> np.ndarray:
    """A float16 array of `a` rounded to nearest even, as numpy's astype(np.float16) does.
    Only float32 goes through torch (float64 would round twice there: through float32)."""
    a = np.asarray(a)
    if a.dtype == np.float16:
        return a
    return _tensor(a).to(torch.float16).numpy() if a.dtype == np.float32 else a.astype(np.float16)


def contiguous(a: np.ndarray) -> np.ndarray:
    """A C-ordered copy of a strided view (a transpose), copied by torch on every core."""
    return _tensor(a).contiguous().numpy()
