"""Run calibration windows through a model one decoder layer at a time.

Only one layer's weights are in memory at once, plus the hidden states of all windows entering
and leaving it (samples x seq_len x hidden floats, ~270 MB for 32 x 256 tokens of a 4096-wide
7B model). Each layer is transformers' own decoder layer class for the architecture, so the
arithmetic is the reference implementation's; the causal mask and rotary tables are built here.
"""

from __future__ import annotations

import importlib
import inspect
import time
from typing import Callable

import numpy as np
import torch
from lsaq_runtime.format import MEMBERS

from .devices import synchronize
from .errors import LsaqError
from .model_source import EMBED, LINEAR_NAMES, ModelSource, ModelSpec

# architecture -> (transformers module, class-name prefix)
_CLASSES = {
    "LlamaForCausalLM": ("llama", "Llama"),
    "MistralForCausalLM": ("mistral", "Mistral"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3"),
    "Phi3ForCausalLM": ("phi3", "Phi3"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3"),
}

# on_weights(i, tensors): the layer's weights, before its forward pass.
# on_hidden(i, h_in, h_out): one mini-batch of hidden states entering and leaving layer i.
# progress(i, num_layers, seconds): layer i is done, it took `seconds`.
# on_layer(i, layer): the loaded decoder layer module, before its forward pass (e.g. to register
# forward pre-hooks on its linears; they go away with the layer).
# on_output(i, h_out): the hidden states of all windows leaving layer i.
WeightsHook = Callable[[int, dict], None]
LayerHook = Callable[[int, torch.nn.Module], None]
HiddenHook = Callable[[int, torch.Tensor, torch.Tensor], None]
HiddenOutHook = Callable[[int, torch.Tensor], None]
ProgressHook = Callable[[int, int, float], None]


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a float32 array; read-only arrays (memory maps) are copied first."""
    return torch.from_numpy(np.require(a, requirements="W"))


def _classes(architecture: str):
    mod, prefix = _CLASSES[architecture]
    m = importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")
    return getattr(m, f"{prefix}DecoderLayer"), getattr(m, f"{prefix}RotaryEmbedding")


def torch_linears(spec: ModelSpec) -> dict[str, tuple[str, ...]]:
    """Linear module of transformers' decoder layer -> the (Llama-style) linears it stacks by
    output rows: itself, or Phi-3's fused qkv_proj / gate_up_proj."""
    if spec.family.fused_linears:
        return dict(MEMBERS)
    return {n: (n,) for n in LINEAR_NAMES}


def module_state(spec: ModelSpec, tensors: dict) -> dict:
    """A decoder layer's tensors (ModelSource.layer_tensors names) keyed as transformers' layer
    module names them: Phi-3's members are stacked back into its fused weights."""
    out = dict(tensors)
    for mod, members in torch_linears(spec).items():
        if len(members) > 1:
            parts = [out.pop(f"{m}.weight") for m in members]
            cat = torch.cat if isinstance(parts[0], torch.Tensor) else np.concatenate
            out[f"{mod}.weight"] = cat(parts)
    return out


def embed(spec: ModelSpec, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings as the model computes them (Gemma scales them by sqrt(hidden))."""
    h = table[ids]
    return h if spec.embed_scale is None else h * torch.tensor(spec.embed_scale, dtype=h.dtype)


def final_norm(spec: ModelSpec, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The model's final RMSNorm (float32): Gemma's scales by (1 + weight)."""
    scale = weight + spec.family.norm_offset if spec.family.norm_offset else weight
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.rms_norm_eps) * scale


def lm_logits(spec: ModelSpec, normed: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Logits from final-normed hidden states (Gemma may soft-cap them)."""
    logits = normed @ head.T
    cap = spec.final_logit_softcapping
    return logits if not cap else torch.tanh(logits / cap) * cap


def position_embeddings(spec: ModelSpec, config, x: torch.Tensor, positions: torch.Tensor
                        ) -> list[dict]:
    """Per decoder layer, the rotary keyword arguments its forward takes, from transformers'
    own rotary classes. Gemma 3 has a RoPE per layer type: transformers 5 computes both with one
    module (a layer_type argument), transformers 4 with a second module on a copy of the config
    (rope_local_base_freq, no scaling) and passes both to every layer."""
    layer_cls, rotary_cls = _classes(spec.architecture)
    with torch.no_grad():
        if spec.local_rope_theta is None:
            cs = rotary_cls(config)(x, positions)
            return [{"position_embeddings": cs} for _ in range(spec.num_layers)]
        if "layer_type" in inspect.signature(rotary_cls.forward).parameters:
            rot = rotary_cls(config)
            by_type = {t: rot(x, positions, t) for t in set(spec.layer_types)}
            return [{"position_embeddings": by_type[t]} for t in spec.layer_types]
        local = _local_rope_config(config)
        glob, loc = rotary_cls(config)(x, positions), rotary_cls(local)(x, positions)
    if "position_embeddings_global" in inspect.signature(layer_cls.forward).parameters:
        return [{"position_embeddings_global": glob, "position_embeddings_local": loc}
                for _ in range(spec.num_layers)]
    return [{"position_embeddings": loc if spec.uses_local_rope(i) else glob}
            for i in range(spec.num_layers)]


def _local_rope_config(config):
    """transformers 4's Gemma 3 sliding-layer RoPE config (Gemma3TextModel.__init__)."""
    import copy

    local = copy.deepcopy(config)
    local.rope_theta = config.rope_local_base_freq
    local.rope_scaling = {"rope_type": "default"}
    return local


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


def embedding_rows(source: ModelSource, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 rows of the windows' distinct tokens, as stored; ids into them): read by row
    ranges where the source can (ModelSource.table_rows_at; Llama 3's table read whole was
    2.1 GB of float32 for a few hundred rows)."""
    uniq, inv = torch.unique(ids, return_inverse=True)
    n = source.table_rows_count(EMBED)
    if int(uniq[-1]) >= n:
        raise LsaqError(f"calibration token id {int(uniq[-1])} is outside the model's {n}-row "
                        "embedding; was it tokenized with this model's tokenizer?")
    return torch.from_numpy(source.table_rows_at(EMBED, uniq.numpy(), as_stored=True)), inv


def forward_layers(source: ModelSource, windows: np.ndarray, *, on_hidden: HiddenHook | None = None,
                   on_weights: WeightsHook | None = None, batch_size: int = 8,
                   progress: ProgressHook | None = None, on_layer: LayerHook | None = None,
                   on_output: HiddenOutHook | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
    """Embed `windows` (int64 [samples, seq_len]) and push them through every decoder layer,
    one layer in memory at a time, on `device` in `dtype` (float32 by default; the hooks then
    see tensors there)."""
    dev = torch.device(device)
    dt = dtype or torch.float32
    spec = source.spec
    config = spec.to_hf_config()
    config._attn_implementation = "sdpa"  # takes our explicit float mask like eager, but faster
    layer_cls, _ = _classes(spec.architecture)
    ids = torch.from_numpy(np.asarray(windows, dtype=np.int64))
    n, seq_len = ids.shape
    rows, inv = embedding_rows(source, ids)
    hidden = embed(spec, rows, inv)
    del rows  # only the gathered rows are needed from here on
    positions = torch.arange(seq_len)[None]
    rotary = position_embeddings(spec, config, hidden[:1], positions)
    if dev.type != "cpu" or dt != torch.float32:
        hidden = hidden.to(dev, dt)
        rotary = [{k: tuple(t.to(dev, dt) for t in v) for k, v in r.items()} for r in rotary]
        positions = positions.to(dev)
    masks: dict[int | None, torch.Tensor] = {}
    for i in range(spec.num_layers):
        t0 = time.perf_counter()
        tensors = source.layer_tensors(i)
        if on_weights:
            on_weights(i, tensors)
        with torch.device("meta"):  # no random init: the real weights are assigned next
            layer = layer_cls(config, i)
        layer.load_state_dict({k: as_tensor(v) for k, v in module_state(spec, tensors).items()},
                              strict=True, assign=True)
        layer.eval()
        if dev.type != "cpu" or dt != torch.float32:
            layer.to(dev, dt)
        if on_layer:
            on_layer(i, layer)
        window = spec.layer_window(i)
        if window not in masks:
            m = causal_mask(seq_len, window)
            masks[window] = (m if dt == torch.float32 else torch.where(
                m < 0, torch.finfo(dt).min, 0.0).to(dt)).to(dev)
        out = torch.empty_like(hidden)
        with torch.no_grad():
            for b in range(0, n, batch_size):
                h_in = hidden[b:b + batch_size]
                out[b:b + batch_size] = run_layer(layer, h_in, masks[window], positions, rotary[i])
                if on_hidden:
                    on_hidden(i, h_in, out[b:b + batch_size])
        if on_output:
            on_output(i, out)
        hidden = out
        del layer, tensors  # free this layer before the next one is read
        if progress:
            synchronize(dev)   # the layer's work, not its queueing
            progress(i, spec.num_layers, time.perf_counter() - t0)


def run_layer(layer, h: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
              rotary: dict) -> torch.Tensor:
    out = layer(h, attention_mask=mask, position_ids=positions, **rotary)
    # transformers 4's decoder layers return a tuple
    return out[0] if isinstance(out, tuple) else out
