"""A transformers model with exactly the weights a bundle graph computes with.

Parity tests compare graphs against it, and a torch perplexity cross-check can run on it:
fp16 layers use weights rounded through float16, int8/int4 layers the dequantized
`QuantizedTensor` (fp16 scales included), fp32 layers the source weights; embeddings and the
LM head are fp16-rounded as in the store; norms and biases are the float32 source values.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import LsaqError
from .export_onnx import (EMBED, FINAL_NORM, FUSED, LM_HEAD, act_key, check_supported,
                          effective_linear_weight, part_precision, table_weight)
from .layerwise import module_state
from .model_source import LINEAR_NAMES, ModelSource
from .quantize import QuantScheme


def reference_model(source: ModelSource, precisions: list[str],
                    schemes: dict[str, QuantScheme], dtype: torch.dtype = torch.float32,
                    act_stats: dict[str, np.ndarray] | None = None,
                    tables: dict[str, str] | None = None):
    """The architecture's transformers model (model_source.SUPPORTED_ARCHITECTURES) in eval mode
    (eager attention). act_stats: as given to write_weight_store (clip 'mse-act'). tables: the
    precision of the embedding table and LM head ({"embed_tokens", "lm_head"}: fp16 when left
    out; a tied model's one table takes embed_tokens')."""
    from transformers import AutoModelForCausalLM

    spec = source.spec
    check_supported(source)
    if len(precisions) != spec.num_layers:
        raise LsaqError(f"{len(precisions)} precisions given for {spec.num_layers} decoder layers")

    def t(a: np.ndarray) -> torch.Tensor:
        # A copy: source arrays may be read-only memory maps.
        return torch.from_numpy(np.array(a, dtype=np.float32)).to(dtype)

    def fp16_rounded(a: np.ndarray) -> torch.Tensor:
        return t(a.astype(np.float16))

    tables = tables or {}
    state = {EMBED: t(table_weight(source.embedding(), tables.get("embed_tokens", "fp16"),
                                   schemes)),
             FINAL_NORM: t(source.tensor(FINAL_NORM))}
    tied = spec.tie_word_embeddings or not source.has_tensor(LM_HEAD)
    if not tied:
        state[LM_HEAD] = t(table_weight(source.tensor(LM_HEAD), tables.get("lm_head", "fp16"),
                                        schemes))
    linear = {f"{n}.weight" for n in LINEAR_NAMES}
    stored_of = {f"{m}.weight": lin for lin, members in FUSED.items() for m in members}
    for i, p in enumerate(precisions):
        layer = {}
        for name, a in source.layer_tensors(i).items():
            if name in linear:
                act = (act_stats or {}).get(act_key(i, stored_of[name]))
                a = effective_linear_weight(a, part_precision(p, name), schemes, act)
            layer[name] = a
        for name, a in module_state(spec, layer).items():  # Phi-3: fused modules
            state[f"model.layers.{i}.{name}"] = t(a)

    config = spec.to_hf_config()
    config.tie_word_embeddings = tied
    # Build on the meta device and adopt the tensors above: no random init, no second copy.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                 dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (tied and k == LM_HEAD)]
    if missing or unexpected:
        raise LsaqError(f"reference model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers stayed on the meta device: rebuild them. Rotary inv_freq ...
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    if hasattr(model.model, "rotary_emb_local"):  # transformers 4's Gemma 3 sliding layers
        from .layerwise import _local_rope_config
        model.model.rotary_emb_local = type(model.model.rotary_emb)(
            config=_local_rope_config(config))
    # ... and Gemma's embedding scale (sqrt(hidden), float32 as transformers makes it)
    emb = model.model.embed_tokens
    if getattr(emb, "embed_scale", None) is not None and emb.embed_scale.is_meta:
        emb.embed_scale = torch.tensor(spec.embed_scale, dtype=torch.float32)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise LsaqError(f"reference model: buffers {left} were not rebuilt off the meta device")
    return model.eval()
