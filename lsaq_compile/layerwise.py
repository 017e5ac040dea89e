"""Run calibration windows through a model one decoder layer at a time.

Only one layer's weights are in memory at once, plus the hidden states of all windows entering
and leaving it (samples x seq_len x hidden floats, ~270 MB for 32 x 256 tokens of a 4096-wide
7B model). Each layer is transformers' own decoder layer class for the architecture, so the
arithmetic is the reference implementation's; the causal mask and rotary tables are built here.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable

import numpy as np
import torch

from .errors import LsaqError
from .model_source import ModelSource

# architecture -> (transformers module, class-name prefix)
_CLASSES = {
    "LlamaForCausalLM": ("llama", "Llama"),
    "MistralForCausalLM": ("mistral", "Mistral"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2"),
}

# on_weights(i, tensors): the layer's weights, before its forward pass.
# on_hidden(i, h_in, h_out): one mini-batch of hidden states entering and leaving layer i.
# progress(i, num_layers, seconds): layer i is done, it took `seconds`.
# on_layer(i, layer): the loaded decoder layer module, before its forward pass (e.g. to register
# forward pre-hooks on its linears; they go away with the layer).
WeightsHook = Callable[[int, dict], None]
LayerHook = Callable[[int, torch.nn.Module], None]
HiddenHook = Callable[[int, torch.Tensor, torch.Tensor], None]
ProgressHook = Callable[[int, int, float], None]


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a float32 array; read-only arrays (memory maps) are copied first."""
    return torch.from_numpy(np.require(a, requirements="W"))


def _classes(architecture: str):
    mod, prefix = _CLASSES[architecture]
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    return getattr(m, f"{prefix}DecoderLayer"), getattr(m, f"{prefix}RotaryEmbedding")


def _sliding_window(config, architecture: str, i: int) -> int | None:
    types = getattr(config, "layer_types", None)
    if types:  # Qwen2 marks which layers slide
        return config.sliding_window if types[i] == "sliding_attention" else None
    return getattr(config, "sliding_window", None) if architecture == "MistralForCausalLM" else None


def causal_mask(seq_len: int, window: int | None = None) -> torch.Tensor:
    """Additive [1, 1, T, T] mask: 0 where query q may see key k (k <= q, q - k < window)."""
    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= (q - k) < window
    mask = torch.zeros(seq_len, seq_len)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[None, None]


def forward_layers(source: ModelSource, windows: np.ndarray, *, on_hidden: HiddenHook | None = None,
                   on_weights: WeightsHook | None = None, batch_size: int = 8,
                   progress: ProgressHook | None = None, on_layer: LayerHook | None = None) -> None:
    """Embed `windows` (int64 [samples, seq_len]) and push them through every decoder layer."""
    spec = source.spec
    config = spec.to_hf_config()
    config._attn_implementation = "sdpa"  # takes our explicit float mask like eager, but faster
    layer_cls, rotary_cls = _classes(spec.architecture)
    ids = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    n, seq_len = ids.shape
    table = as_tensor(source.embedding())
    if int(ids.max()) >= table.shape[0]:
        raise LsaqError(f"calibration token id {int(ids.max())} is outside the model's "
                        f"{table.shape[0]}-row embedding; was it tokenized with this model's "
                        "tokenizer?")
    hidden = table[ids]
    del table  # only the gathered rows are needed from here on
    positions = torch.arange(seq_len)[None]
    with torch.no_grad():
        cos_sin = rotary_cls(config)(hidden[:1], positions)
    masks: dict[int | None, torch.Tensor] = {}
    for i in range(spec.num_layers):
        t0 = time.perf_counter()
        tensors = source.layer_tensors(i)
        if on_weights:
            on_weights(i, tensors)
        with torch.device("meta"):  # no random init: the real weights are assigned next
            layer = layer_cls(config, i)
        layer.load_state_dict({k: as_tensor(v) for k, v in tensors.items()},
                              strict=True, assign=True)
        layer.eval()
        if on_layer:
            on_layer(i, layer)
        window = _sliding_window(config, spec.architecture, i)
        if window not in masks:
            masks[window] = causal_mask(seq_len, window)
        out = torch.empty_like(hidden)
        with torch.no_grad():
            for b in range(0, n, batch_size):
                h_in = hidden[b:b + batch_size]
                out[b:b + batch_size] = layer(h_in, attention_mask=masks[window],
                                              position_ids=positions, position_embeddings=cos_sin)
                if on_hidden:
                    on_hidden(i, h_in, out[b:b + batch_size])
        hidden = out
        del layer, tensors  # free this layer before the next one is read
        if progress:
            progress(i, spec.num_layers, time.perf_counter() - t0)
