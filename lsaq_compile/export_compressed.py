"""Export one variant of a bundle as a compressed-tensors Hugging Face folder (vLLM, transformers).

The folder is what llm-compressor saves: config.json with a `quantization_config` (quant_method
compressed-tensors, one config group per stored precision listing the modules it targets, format
pack-quantized: vLLM's weight-only INT4/INT8 kernels read that format), the weights in
safetensors, the bundle's tokenizer files and a generation_config.json. Every quantized weight is
written from the bundle's own codes, scales and zero points:

  per-channel symmetric INT8 -> num_bits 8, strategy channel, symmetric (scale [N, 1])
  group INT4 with integer zero point -> num_bits 4, strategy group, group_size, symmetric false
  per-channel / group symmetric INT4 -> num_bits 4, strategy channel / group, symmetric
  fp16 linears -> plain float16 weights, listed in `ignore`
  a quantized LM head -> a quantized Linear target like the decoder's (a tied table: untied)
  a quantized embedding -> float32 of its dequantized values (exact; vLLM reads no quantized
                           embedding), or float16 with --embedding-dtype float16

compressed-tensors stores codes as signed integers (q - 2^(bits-1)) and packs them with that
offset added back, so the packed words are exactly the bundle's unsigned codes, 32/bits to an
int32, first element in the low bits; zero points likewise, packed along the output dimension.
qkv and gate_up share one precision in every plan, as vLLM requires of fused layers.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsaq_runtime.format import EMBED, LM_HEAD, layer_key, layer_prefix

from .bundle_reader import BundleReader, Quantized, StoredWeight, role_key
from .errors import LsaqError
from .export_common import (FOLDER_MARKER, check_parent, check_target, clean_stale,
                            export_record, folder_refusal, put_in_place, tmp_path)
from .model_source import FAMILIES

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
HF_MEMBERS = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
              "self_attn.o_proj": ("self_attn.o_proj",),
              "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
              "mlp.down_proj": ("mlp.down_proj",)}


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes [R, C] -> int32 [R, ceil(C * bits / 32)], 32/bits codes a word, the first
    in the low bits (compressed-tensors' pack_to_int32 for bits 4 and 8)."""
    per = 32 // bits
    r, c = codes.shape
    pad = (-c) % per
    out = np.empty((r, (c + pad) // per), np.uint32)
    shifts = (np.arange(per, dtype=np.uint32) * bits)
    step = max(1, (1 << 22) // max(c, 1))     # a few MB of uint32 at a time, not 4x the tensor
    for a in range(0, r, step):
        u = np.pad(codes[a:a + step].astype(np.uint32), ((0, 0), (0, pad))).reshape(-1, out.shape[1], per)
        out[a:a + step] = np.bitwise_or.reduce(u << shifts, axis=-1)
    return out.view(np.int32)


def dequantized(q: Quantized, dtype=np.float16) -> tuple[np.ndarray, float]:
    """(`dtype` [N, K] of a stored quantized weight's dequantized values, the relative RMS error
    of that rounding: 0 for float32, which is what the bundle's kernels compute with), a few
    rows at a time (a 7B vocabulary table never sits in float64)."""
    out = np.empty((q.n, q.k), dtype)
    err2 = ref2 = 0.0
    step = max(1, (1 << 22) // max(q.k, 1))
    for a in range(0, q.n, step):
        b = min(q.n, a + step)
        w = Quantized(q.scheme, b - a, q.k, q.codes[a:b], q.scales[a:b],
                      q.zero_points[a:b]).dequantize()
        out[a:b] = w.astype(dtype)
        d = out[a:b].astype(np.float64) - w
        err2 += float((d * d).sum())
        ref2 += float((w.astype(np.float64) ** 2).sum())
    return out, (0.0 if ref2 == 0 else math.sqrt(err2 / ref2))


def ct_weights_args(q: Quantized) -> dict:
    """The compressed-tensors `weights` arguments of a stored quantized weight: the one place
    mapping a bundle scheme to a compressed-tensors scheme."""
    s = q.scheme
    return {"num_bits": s.bits, "type": "int", "symmetric": s.symmetric,
            "strategy": s.strategy, "group_size": s.group_size, "dynamic": False}


def ct_tensors(q: Quantized) -> dict[str, np.ndarray]:
    """The module's compressed tensors: weight_packed, weight_scale, [weight_zero_point],
    weight_shape."""
    s = q.scheme
    if s.strategy == "group" and q.k % s.block:
        raise LsaqError(f"a group-quantized weight with {q.k} inputs, not a multiple of its group "
                        f"size {s.block}: compressed-tensors cannot state its last group")
    codes = np.ascontiguousarray(q.codes[:, : q.k])
    out = {"weight_packed": pack_int32(codes, s.bits)}
    if s.strategy == "channel":
        out["weight_scale"] = np.ascontiguousarray(q.scales[:, :1])
    else:
        out["weight_scale"] = np.ascontiguousarray(q.scales)
    if not s.symmetric:
        zp = q.zero_points if s.strategy == "group" else q.zero_points[:, :1]
        out["weight_zero_point"] = np.ascontiguousarray(pack_int32(np.ascontiguousarray(zp.T),
                                                                   s.bits).T)
    out["weight_shape"] = np.asarray([q.n, q.k], np.int64)
    return out


# ------------------------------------------------------------------------------ config
def _rope_config(facts, mo: dict) -> dict:
    """rope_theta and rope_scaling in transformers' (and vLLM's) config form. A fixed RoPE
    whose frequencies are divided by per-frequency factors (Llama 3.x, YaRN, Phi-3 short) is
    written as longrope with equal short and long factors, which computes the same."""
    from .export_gguf import _default_inv, _rope_base

    dim = mo["head_dim"]
    inv = facts.inv_freq.astype(np.float64)
    base = _rope_base(inv, dim)
    ratio = _default_inv(base, dim).astype(np.float64) / inv
    attn = float(facts.rope_attention_factor)
    out: dict = {"rope_theta": base}
    if facts.rope_length_dependent and facts.inv_freq_long is None:
        raise LsaqError("this bundle's RoPE is dynamic NTK, whose factor the export does not "
                        "recover from the graph: not exported")
    if facts.inv_freq_long is not None:
        long = _default_inv(base, dim).astype(np.float64) / facts.inv_freq_long.astype(np.float64)
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": ratio.tolist(),
                               "long_factor": long.tolist(), "attention_factor": attn,
                               "original_max_position_embeddings": int(facts.rope_switch)}
    elif np.allclose(ratio, 1.0, rtol=2e-6, atol=0) and abs(attn - 1) < 1e-6:
        pass
    elif np.allclose(ratio, ratio[0], rtol=2e-6, atol=0) and abs(attn - 1) < 1e-6:
        out["rope_scaling"] = {"rope_type": "linear", "factor": float(ratio[0])}
    else:
        out["rope_scaling"] = {"rope_type": "longrope", "short_factor": ratio.tolist(),
                               "long_factor": ratio.tolist(), "attention_factor": attn,
                               "original_max_position_embeddings": int(mo["max_position_embeddings"])}
    return out


def _pad_id(reader: BundleReader) -> int | None:
    from .export_gguf import _config_token_id

    tj = reader.tokenizer_json()
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    pad = _config_token_id(reader, "pad_token", (tj.get("model") or {}).get("vocab", {}), added)
    return pad if pad is not None and pad < reader.model["vocab_size"] else None


def hf_config(reader: BundleReader, facts, tied: bool) -> dict:
    from .export_gguf import _rope_base

    mo = reader.model
    arch = mo["architecture"]
    fam = FAMILIES[arch]
    tok = reader.manifest["tokenizer"]
    eos = tok.get("eos_token_ids") or []
    cfg = {
        "architectures": [arch], "model_type": fam.model_type,
        "hidden_size": mo["hidden_size"], "intermediate_size": mo["intermediate_size"],
        "num_hidden_layers": mo["num_layers"], "num_attention_heads": mo["num_attention_heads"],
        "num_key_value_heads": mo["num_key_value_heads"], "head_dim": mo["head_dim"],
        "vocab_size": mo["vocab_size"], "max_position_embeddings": mo["max_position_embeddings"],
        "rms_norm_eps": facts.eps, "tie_word_embeddings": tied,
        "bos_token_id": tok.get("bos_token_id"),
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        # explicit: some config classes default to an id outside a small vocabulary (Phi-3)
        "pad_token_id": _pad_id(reader),
        "torch_dtype": "float16", "use_cache": True,
        **_rope_config(facts, mo),
    }
    act = "gelu_pytorch_tanh" if facts.activation == "gelu_tanh" else "silu"
    if arch == "Gemma3ForCausalLM":
        cfg["hidden_activation"] = act
        # the graph holds the float32 scale; the config an integer scalar (its -1/2 power)
        qpas = 1.0 / facts.attention_scale ** 2
        if abs(qpas - round(qpas)) > 1e-4 * qpas:
            raise LsaqError(f"the bundle scales attention by {facts.attention_scale:.6g}, which "
                            "no integer query_pre_attn_scalar gives: not exported")
        cfg["query_pre_attn_scalar"] = int(round(qpas))
        cfg["final_logit_softcapping"] = facts.softcap
        if facts.inv_freq_local is not None:
            cfg["rope_local_base_freq"] = _rope_base(facts.inv_freq_local.astype(np.float64),
                                                     mo["head_dim"])
    else:
        cfg["hidden_act"] = act
        if abs(facts.attention_scale * math.sqrt(mo["head_dim"]) - 1) > 1e-5:
            raise LsaqError(f"the bundle scales attention by {facts.attention_scale:.6g}, not "
                            f"1/sqrt(head_dim); a {arch} config cannot say so: not exported")
    rs = cfg.get("rope_scaling") or {}
    if arch == "Phi3ForCausalLM" and "original_max_position_embeddings" in rs:
        # Phi-3's config reads its own top-level key (default 4096) over the scaling dict's
        cfg["original_max_position_embeddings"] = rs["original_max_position_embeddings"]
    if arch == "LlamaForCausalLM" and facts.qkv_bias:
        cfg["attention_bias"] = True
    windows = [w for w in facts.windows if w]
    if windows:
        if len(set(windows)) > 1:
            raise LsaqError(f"layers use different sliding windows {sorted(set(windows))}")
        cfg["sliding_window"] = int(windows[0])
        if arch != "MistralForCausalLM" and arch != "Phi3ForCausalLM":
            cfg["layer_types"] = ["sliding_attention" if w else "full_attention"
                                  for w in facts.windows]
        if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            cfg["use_sliding_window"] = True
    elif arch in ("MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
                  "Qwen3ForCausalLM", "Gemma3ForCausalLM"):
        cfg["sliding_window"] = None
    return cfg


def _portable_tokenizer_config(path: Path, reader: BundleReader) -> None:
    """The bundle's tokenizer_config.json, readable by transformers 4 as well as 5 (vLLM pins
    its own transformers): the fast tokenizer class both name, and the chat template inline
    too (older transformers do not read chat_template.jinja)."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        cfg = {}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for k in ("backend", "is_local", "local_files_only"):   # transformers 5's own bookkeeping
        cfg.pop(k, None)
    template = reader.manifest["tokenizer"].get("chat_template")
    if isinstance(template, str):
        cfg["chat_template"] = template
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------ tensor plan
@dataclass
class Module:
    """One Hugging Face linear module written from (rows of) a stored weight."""

    name: str                  # e.g. model.layers.3.self_attn.q_proj
    weight: StoredWeight
    lo: int
    hi: int


def _modules(reader: BundleReader, weights: list[StoredWeight], fused: bool) -> list[Module]:
    mo = reader.model
    q_dim = mo["num_attention_heads"] * mo["head_dim"]
    kv_dim = mo["num_key_value_heads"] * mo["head_dim"]
    ff = mo["intermediate_size"]
    rows = {"self_attn.q_proj": (0, q_dim), "self_attn.k_proj": (q_dim, q_dim + kv_dim),
            "self_attn.v_proj": (q_dim + kv_dim, q_dim + 2 * kv_dim),
            "mlp.gate_proj": (0, ff), "mlp.up_proj": (ff, 2 * ff)}
    out = []
    for w in weights:
        if w.role != "linear":
            continue
        layer, lin = w.name.split(".", 3)[2], w.name.split(".", 3)[3].removesuffix(".weight")
        members = (lin,) if fused or len(HF_MEMBERS[lin]) == 1 else HF_MEMBERS[lin]
        for m in members:
            lo, hi = rows.get(m, (0, w.shape[0])) if m != lin else (0, w.shape[0])
            out.append(Module(layer_key(layer, m), w, lo, hi))
    return out


def _slice(q: Quantized, lo: int, hi: int) -> Quantized:
    return Quantized(q.scheme, hi - lo, q.k, q.codes[lo:hi], q.scales[lo:hi], q.zero_points[lo:hi])


# ------------------------------------------------------------------------------ export
@dataclass
class CTReport:
    path: Path
    groups: list[dict]
    ignored: int
    bytes: int
    seconds: float
    notes: list[str]

    def lines(self) -> list[str]:
        g = "; ".join(f"{x['weights']['num_bits']}-bit {x['weights']['strategy']}"
                      + (f" {x['weights']['group_size']}" if x['weights']['group_size'] else "")
                      + (" symmetric" if x['weights']['symmetric'] else " asymmetric")
                      + f": {len(x['targets'])} modules" for x in self.groups)
        return [f"wrote {self.path} ({self.bytes / 2**20:,.1f} MiB; {g or 'no quantized modules'}"
                f"; {self.ignored} float16 linears in ignore) in {self.seconds:.1f}s",
                "every quantized weight holds the bundle's codes, scales and zero points exactly",
                *self.notes]


def export_compressed(bundle, variant: str, out, force: bool = False, verify: bool = True,
                      progress=None, errors_json: Path | None = None,
                      embedding_dtype: str = "float32") -> CTReport:
    """Write variant `variant` of `bundle` as a compressed-tensors folder `out`. embedding_dtype
    (float32 | float16): how a quantized embedding table is written (its dequantized values:
    float32 exact, float16 half the bytes and rounded)."""
    from .store import SafetensorsWriter

    t0 = time.perf_counter()
    if embedding_dtype not in ("float32", "float16"):
        raise LsaqError(f"embedding dtype {embedding_dtype!r}: choose float32 or float16")
    out = Path(out)
    check_parent(out)
    check_target(out, force, folder_refusal)
    reader = BundleReader.open(bundle, verify=verify)
    v = reader.variant(variant)
    arch = reader.model["architecture"]
    if arch not in FAMILIES:
        raise LsaqError(f"architecture {arch} has no transformers class this exporter knows")
    facts = reader.arch_facts(v)
    fam = facts.family
    # the LM head of the GPU graph (float16) unless the variant's tables are quantized
    weights = reader.variant_weights(v, "fp16")
    by_name = {w.name: w for w in weights}
    emb, lmh = by_name[EMBED], by_name.get(LM_HEAD)
    if lmh is None and emb.precision not in ("fp16", "fp32"):
        # A tied model's quantized table: the head is written as a quantized Linear module
        # (the table's own codes, exact) and the embedding as float16 (below), so the folder
        # is untied.
        lmh = StoredWeight(LM_HEAD, emb.base, emb.precision, emb.shape, "lm_head")
    tied = lmh is None
    cfg = hf_config(reader, facts, tied)
    modules = _modules(reader, weights, fam.fused_linears)
    mo = reader.model
    L, heads, hd = mo["num_layers"], mo["num_attention_heads"], mo["head_dim"]
    offset = np.float32(fam.norm_offset)
    notes: list[str] = []

    # names of every tensor, known before any is written (the writer reserves its header)
    float_tensors: list[tuple[str, object]] = []    # (name, fetch)
    table_records: list[dict] = []
    emb_dequantized = None
    if emb.precision in ("fp16", "fp32"):
        float_tensors.append((EMBED, lambda: reader.float_weight(emb)))
    else:
        # compressed-tensors can quantize an Embedding (transformers would read it), but vLLM
        # gives its VocabParallelEmbedding no compressed-tensors method (get_quant_method
        # quantizes LinearBase, Attention and FusedMoE only), so a folder with a packed
        # embedding would not load there: the table's dequantized values, in float32 (exactly
        # what the bundle computes; an engine running float16 rounds them as it loads) or, with
        # embedding_dtype="float16", in half the bytes and rounded here
        np_dtype = np.float32 if embedding_dtype == "float32" else np.float16

        def emb_dequantized():
            w, err = dequantized(reader.quantized(emb), np_dtype)
            stored = emb.shape[0] * emb.shape[1] * (8 if emb.precision == "int8" else 4) / 8
            how = ("exact" if err == 0 else
                   f"not exact: rounded to float16, relative RMS error {err:.2e}")
            notes.append(f"model.embed_tokens is stored {emb.precision} in the bundle; written as "
                         f"{embedding_dtype} of its dequantized values ({how}; "
                         f"{w.nbytes / 2**20:,.1f} MiB where the bundle's codes take "
                         f"{stored / 2**20:,.1f} MiB: vLLM reads no quantized embedding)")
            table_records.append({"module": "model.embed_tokens", "format": embedding_dtype,
                                  "exact": err == 0, "rel_rms": err, "stored": emb.precision})
            return w
        float_tensors.append((EMBED, emb_dequantized))
    if lmh is not None:
        if lmh.precision in ("fp16", "fp32"):
            float_tensors.append((LM_HEAD, lambda: reader.float_weight(lmh)))
        else:   # a quantized Linear module like the decoder's (compressed-tensors target lm_head)
            modules.append(Module("lm_head", lmh, 0, lmh.shape[0]))
    float_tensors.append(("model.norm.weight", lambda: reader.array("model.norm.weight") - offset))
    norms = ["input_layernorm", "post_attention_layernorm"]
    if fam.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    for i in range(L):
        p = layer_prefix(i)
        for n in norms:
            float_tensors.append((f"{p}.{n}.weight",
                                  lambda k=f"{p}.{n}.weight": reader.array(k) - offset))
        if fam.qk_norm:
            key = f"{p}.self_attn.qk_norm.weight"
            float_tensors.append((f"{p}.self_attn.q_norm.weight",
                                  lambda k=key: reader.array(k)[0] - offset))
            float_tensors.append((f"{p}.self_attn.k_norm.weight",
                                  lambda k=key: reader.array(k)[heads] - offset))
        if facts.qkv_bias:
            key = f"{p}.self_attn.qkv_proj.bias"
            q_dim, kv = heads * hd, mo["num_key_value_heads"] * hd
            spans = {"q_proj": (0, q_dim), "k_proj": (q_dim, q_dim + kv),
                     "v_proj": (q_dim + kv, q_dim + 2 * kv)}
            if fam.fused_linears:
                spans = {"qkv_proj": (0, q_dim + 2 * kv)}
            for m, (lo, hi) in spans.items():
                float_tensors.append((f"{p}.self_attn.{m}.bias",
                                      lambda k=key, lo=lo, hi=hi: reader.array(k)[lo:hi]))

    groups: dict[str, dict] = {}
    ignore: list[str] = []
    names = [n for n, _ in float_tensors]
    for m in modules:
        if m.weight.precision in ("fp16", "fp32"):
            names.append(f"{m.name}.weight")
            ignore.append(m.name)
        else:
            names += [f"{m.name}.{r}" for r in ("weight_packed", "weight_scale", "weight_shape")]
            if reader.has(role_key(m.weight.base, "zero_points")):
                names.append(f"{m.name}.weight_zero_point")
    if lmh is not None and lmh.precision in ("fp16", "fp32"):
        ignore.append("lm_head")

    clean_stale(out)
    tmp = tmp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    records = []
    try:
        tmp.mkdir()
        with SafetensorsWriter(tmp, WEIGHTS_FILE, names) as st:
            for n, fetch in float_tensors:
                a = np.asarray(fetch())
                float_table = n in (EMBED, LM_HEAD) and fetch is not emb_dequantized
                st.add(n, a.astype(np.float16) if float_table else a)
            cur_base, cur = None, None
            for j, m in enumerate(modules):
                if m.weight.precision in ("fp16", "fp32"):
                    if cur_base != m.weight.base:
                        cur_base, cur = m.weight.base, reader.float_weight(m.weight)
                    st.add(f"{m.name}.weight", np.ascontiguousarray(cur[m.lo:m.hi]))
                    records.append({"module": m.name, "format": "float16", "exact": True})
                    continue
                if cur_base != m.weight.base:
                    cur_base, cur = m.weight.base, reader.quantized(m.weight)
                q = _slice(cur, m.lo, m.hi)
                args = ct_weights_args(q)
                key = json.dumps(args, sort_keys=True)
                groups.setdefault(key, {"targets": [], "weights": args})["targets"].append(m.name)
                for role, arr in ct_tensors(q).items():
                    st.add(f"{m.name}.{role}", arr)
                records.append({"module": m.name, "format": "pack-quantized", "exact": True,
                                **args})
                if progress and (j % 100 == 0 or j + 1 == len(modules)):
                    progress(f"{j + 1}/{len(modules)} linear modules")
        config_groups = {}
        for gi, g in enumerate(groups.values()):
            w = {**g["weights"], "block_structure": None, "actorder": None, "observer": None,
                 "observer_kwargs": {}}
            config_groups[f"group_{gi}"] = {"targets": g["targets"], "weights": w,
                                            "input_activations": None,
                                            "output_activations": None,
                                            "format": "pack-quantized"}
        if config_groups:   # an all-float16 variant is a plain float16 folder
            cfg["quantization_config"] = {
                "quant_method": "compressed-tensors", "format": "pack-quantized",
                "quantization_status": "compressed", "config_groups": config_groups,
                "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
                "sparsity_config": {}, "transform_config": {},
            }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        for f in TOKENIZER_FILES:
            src = reader.tokenizer_dir() / f
            if src.is_file():
                shutil.copyfile(src, tmp / f)
        _portable_tokenizer_config(tmp / "tokenizer_config.json", reader)
        files = sorted(p.name for p in tmp.iterdir())
        rec = {**export_record(reader, variant, "compressed-tensors"), "files": files}
        (tmp / FOLDER_MARKER).write_text(json.dumps(rec, indent=1), encoding="utf-8")
        check_target(out, force, folder_refusal)
        put_in_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LsaqError(f"{e.filename or out}: cannot write the export ({e.strerror or e}); "
                        "nothing was written: free disk space or choose another -o") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if errors_json is not None:
        Path(errors_json).write_text(json.dumps(table_records + records, indent=1),
                                     encoding="utf-8")
    size = sum(p.stat().st_size for p in out.iterdir())
    return CTReport(out, list(config_groups.values()), len(ignore), size,
                    time.perf_counter() - t0, notes)


# ------------------------------------------------------------------------------ checking
def transformers_model(folder, dtype=None):
    """(model, how) for checking an export in transformers on the CPU.

    how = "from_pretrained": transformers' own compressed-tensors integration loaded it.
    how = "decompressor": the folder holds asymmetric (zero-point) weights, which transformers
    5.25 with compressed-tensors 0.20.1 cannot load (its meta-device model expects unpacked zero
    points; compressed-tensors' own saved checkpoints fail the same way, llm-compressor #1618):
    the model is built from config.json and compressed-tensors' ModelCompressor decompresses the
    folder's packed tensors into it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = dtype or torch.float32
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    qc = cfg.get("quantization_config")
    asym = qc and any(not g["weights"]["symmetric"] for g in qc["config_groups"].values())
    if not asym:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval(), "from_pretrained"
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                 apply_quantization_config)
    from safetensors.torch import load_file

    qconf = QuantizationConfig.model_validate(cfg.pop("quantization_config"))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    qconf.quantization_status = QuantizationStatus.FROZEN
    apply_quantization_config(model, qconf)
    ModelCompressor(quantization_config=qconf).compress_model(model)   # packed shapes
    sd = {k: (v.to(dtype) if v.is_floating_point() else v)
          for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == LM_HEAD)]
    if missing or unexpected:
        raise LsaqError(f"{folder}: tensors missing {missing[:3]}, unexpected {unexpected[:3]}")
    ModelCompressor(quantization_config=qconf).decompress_model(model)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), "decompressor"
