"""Where the torch stages run: `--device auto|cpu|cuda`, the compute dtype there, and the
clock text of progress lines (shared by the exact and the streamed measurements)."""

from __future__ import annotations

import torch

from .errors import LsaqError


def _device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise LsaqError(f"device {device!r}: use auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LsaqError("device cuda: torch sees no CUDA device (a CPU-only torch, or no GPU)")
    return torch.device(device)


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


def _clock(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
