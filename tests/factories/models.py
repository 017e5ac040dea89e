"""Tiny random models of every supported family, made to show what real checkpoints show
(a BOS-dependent tokenizer, a 262k vocabulary), saved as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

from .data import C4


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, norm_noise: float = 0.0,
                    dtype: str = "float32", **overrides) -> Path:
    """Save a tiny random model of a supported family (arch: its transformers model_type, e.g.
    "llama", "qwen3", "phi3", "gemma3_text") in safetensors, with a working tokenizer.
    norm_noise: spread of the norm weights (0: transformers' init); dtype: the stored type
    (float32, or float16/bfloat16 as real checkpoints ship)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    config = AutoConfig.for_model(arch, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the default init so layers visibly matter
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif norm_noise and name.endswith("norm.weight"):
                p.add_(norm_noise * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path, cfg["vocab_size"])
    return path

# Tiny models of every supported family for make_tiny_model (on top of its shared sizes: hidden
# 64, 4 layers, 4 heads, 2 KV heads), each exercising its family's own pieces.
_LONG = [1.0, 1.3, 1.9, 2.8, 4.0, 6.0, 9.0, 14.0]

TINY_FAMILIES = {
    "llama": dict(arch="llama"),
    "llama3": dict(arch="llama", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    # past 16 positions the RoPE base grows with the length
    "llama_dynamic": dict(arch="llama", max_position_embeddings=16,
                          rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    "mistral": dict(arch="mistral", sliding_window=8),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3", head_dim=32, tie_word_embeddings=True, norm_noise=0.2),
    # fused qkv / gate_up, a window on every layer, longrope past 16 positions (exactly these
    # three keys: transformers 4's Phi-3 config accepts no others)
    "phi3": dict(arch="phi3", pad_token_id=0, sliding_window=12,
                 original_max_position_embeddings=16,
                 rope_scaling={"type": "longrope", "short_factor": [1.0] * 4 + [1.2] * 4,
                               "long_factor": _LONG}),
    "gemma3": dict(arch="gemma3_text", head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                "sliding_attention"],
                   rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 2.0},
                   final_logit_softcapping=8.0, tie_word_embeddings=True, norm_noise=0.2),
}

def make_tiny_family(path: Path, family: str, **overrides) -> Path:
    return make_tiny_model(path, **{**TINY_FAMILIES[family], **overrides})

def save_tiny_tokenizer(path: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer over the first vocab_size ids, as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = (C4.read_text(encoding="utf-8")[:100_000] if C4.is_file()
            else "the quick brown fox jumps over the lazy dog " * 200).splitlines()
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)

def large_vocab_tokenizer(vocab_size: int = 262_144):
    """A byte-level BPE tokenizer with `vocab_size` tokens and as many merges, like Gemma 3's
    262,144 (whose tokenizer.json alone takes about 180 MiB of host memory once loaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZĠ0123456789")
    merges, level = [], list(letters)
    while len(vocab) < vocab_size:    # words of growing length over `letters`
        nxt = []
        for a in level:
            for b in letters:
                if len(vocab) >= vocab_size:
                    break
                if a + b not in vocab:
                    vocab[a + b] = len(vocab)
                    merges.append((a, b))
                    nxt.append(a + b)
        level = nxt
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok

def make_large_vocab_model(path: Path, vocab_size: int = 262_144, hidden: int = 64,
                           layers: int = 2) -> Path:
    """A tiny random Llama with a real-size vocabulary and tokenizer: the terms that grow with
    the vocabulary (tokenizer, token tables and their copies, logits) dominate its memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=large_vocab_tokenizer(vocab_size),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=vocab_size,
                               max_position_embeddings=4096, tie_word_embeddings=True,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    return path

def add_bos_to_tokenizer(path: Path) -> None:
    """Make a saved tiny model's tokenizer start every sequence with BOS (<s>, id 1), as
    Llama 2, Gemma and Mistral tokenizers do: a post-processor in tokenizer.json."""
    import json

    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = True
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
