"""Activation statistics for the act-weighted clipping search (quantization clip 'mse-act').

For each stored linear of each decoder layer: the mean of x^2 per input feature of that
linear's input, over every calibration token. A weight's rounding error reaches the output
through x, so E[(x @ (W - W_q).T)^2] ~= sum_k E[x_k^2] (W - W_q)_k^2 when features are treated
as independent: the AWQ / llama.cpp "importance matrix" idea. The inputs come from the float
model (transformers' own decoder layers, one at a time: layerwise.forward_layers).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import NonFiniteError
from .export_onnx import FUSED, act_key
from .layerwise import HiddenOutHook, ProgressHook, forward_layers, torch_linears
from .model_source import ModelSource


def activation_stats(source: ModelSource, windows: np.ndarray, batch_size: int = 8,
                     progress: ProgressHook | None = None, device: str = "cpu",
                     on_output: HiddenOutHook | None = None, dtype=None) -> dict[str, np.ndarray]:
    """{act_key(i, lin): float32 [K]} for every layer i and stored linear lin (export_onnx.FUSED).

    windows: int64 [samples, seq_len] calibration token ids (calibration.load_calibration);
    device: auto | cpu | cuda (one layer there at a time); dtype: the compute dtype (the
    device's by default: float32 on the CPU, float16 on the GPU; the squares are float32 and
    their sums float64 either way); on_output(i, h): the states leaving layer i, all windows
    (a build keeps them: estimate.reference_sink). Raises NonFiniteError where they are not
    finite."""
    from .devices import _device, _dtype

    dev = _device(device)
    dtype = _dtype(dev, dtype)
    windows = np.asarray(windows, dtype=np.int64)
    sums: dict[str, torch.Tensor] = {}
    # transformers' module holding each stored linear's first member (Phi-3: its fused module)
    module_of = {m: mod for mod, members in torch_linears(source.spec).items() for m in members}

    def on_layer(i: int, layer: torch.nn.Module) -> None:
        for lin, members in FUSED.items():
            # The members of a fused linear (q/k/v, gate/up) read one input: hook the first.
            def hook(module, args, key=act_key(i, lin)):
                x = args[0].reshape(-1, args[0].shape[-1])
                # squared in float32: float16 squares overflow from |x| = 256 (a 7B's down_proj
                # inputs reach thousands)
                s = x.float().square().sum(dim=0, dtype=torch.float64)
                sums[key] = s if key not in sums else sums[key] + s

            layer.get_submodule(module_of[members[0]]).register_forward_pre_hook(hook)

    forward_layers(source, windows, on_layer=on_layer, batch_size=batch_size, progress=progress,
                   on_output=on_output, device=dev, dtype=dtype)
    tokens = windows.size
    out = {}
    for key, s in sums.items():
        mean = (s / tokens).cpu().numpy().astype(np.float32)
        if not np.all(np.isfinite(mean)):
            raise NonFiniteError(f"{key}: non-finite activation statistics; the hidden states "
                                 f"overflowed {str(dtype).replace('torch.', '')} or the weights "
                                 "hold NaN/inf — check the model files")
        out[key] = mean
    return out


def windows_fingerprint(windows: np.ndarray) -> str:
    """sha256 of the token windows the statistics were measured on (int64, row-major), so they
    can be measured again and checked however the windows were cut from the text."""
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()
