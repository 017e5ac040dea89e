"""Shared fixtures: a tiny random Llama folder, a bundle built from it, and the real SmolLM2
bundle (built once per session; the real model must be exercised by the suite)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def _private_verify_cache(tmp_path_factory):
    """Verified-file stamps go to a folder of this test run, not the user's cache."""
    os.environ["LSAQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("lsaq-cache"))
SHARED_DATA = REPO.parent / "shared" / "data"
C4 = SHARED_DATA / "c4-calibration.txt"
WIKITEXT = SHARED_DATA / "wikitext-2-raw-test.txt"
ZEROSHOT = SHARED_DATA / "zeroshot"
# lm-evaluation-harness is in the test extra; the dependency-floor run (older transformers and
# huggingface-hub, which lm-eval's `datasets` cannot use) turns it off.
LM_EVAL = importlib.util.find_spec("lm_eval") is not None and os.environ.get("LSAQ_SKIP_LM_EVAL") != "1"


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0, norm_noise: float = 0.0,
                    **overrides) -> Path:
    """Save a tiny random model of a supported family (arch: its transformers model_type, e.g.
    "llama", "qwen3", "phi3", "gemma3_text") in safetensors, with a working tokenizer.
    norm_noise: spread of the norm weights (0: transformers' init)."""
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
    model.save_pretrained(path, safe_serialization=True)
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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _small_profile(**scoring):
    from lsaq_compile.profiles import Profile

    p = Profile(name="test")
    p.scoring.calibration = str(C4) if C4.is_file() else ""
    # the fixtures built from this profile were checked on the exact measurement; the streamed
    # estimate (the default profile's) is built and checked in test_measure.py/test_estimate.py
    p.scoring.measure = "exact"
    for k, v in scoring.items():
        setattr(p.scoring, k, v)
    return p


def _exact_paper_profile(samples: int, seq_len: int, ladder: str):
    """The paper's quantizer (per-channel symmetric round to nearest) and Jaccard order, ranked
    by precision, on the exact kernel path (float activations, float LM head): what the parity
    tests compare with transformers."""
    prof = _small_profile(samples=samples, seq_len=seq_len, metric="jaccard")
    prof.quantization.cpu_accuracy_level, prof.quantization.cpu_lm_head = 0, "fp16"
    prof.build.ladder, prof.build.quality_samples = ladder, 0
    q = prof.quantization
    q.scheme, q.symmetric, q.clip = "channel", True, "none"
    return prof


@pytest.fixture(scope="session")
def tiny_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    # Every INT4 count (ladder "full"); smollm_bundle keeps the fast defaults.
    prof = _exact_paper_profile(samples=8, seq_len=64, ladder="full")
    return build_bundle(tiny_llama_dir, out, profile=prof, progress=Progress(quiet=True))


@pytest.fixture(scope="session")
def smollm_bundle(tmp_path_factory) -> Path:
    """The real default model through the default profile (measured sensitivity, a ladder by
    bytes, quality measured per variant); calibration and rungs kept small for speed."""
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    if os.environ.get("LSAQ_TEST_BUNDLE"):  # reuse a bundle built by hand while developing
        return Path(os.environ["LSAQ_TEST_BUNDLE"])
    out = tmp_path_factory.mktemp("bundles") / "smollm2"
    prof = _small_profile(samples=2, seq_len=96)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 4, 1, 4
    return build_bundle(None, out, profile=prof, progress=Progress(quiet=True))


def empty_cache_feed(manifest: dict, ids: list[int], keep: int = 0) -> dict:
    """Inputs of a bundle graph for one sequence on an empty KV cache (a plain session, no
    IOBinding): the reference the runtime's cached runs are compared with. keep 0: all logits."""
    mo = manifest["model"]
    empty = np.zeros((1, mo["num_key_value_heads"], 0, mo["head_dim"]), np.float32)
    feed = {"input_ids": np.asarray([ids], np.int64),
            "seqlens_k": np.array([len(ids) - 1], np.int32),
            "total_sequence_length": np.array(len(ids), np.int32),
            "num_logits_to_keep": np.array(keep, np.int64)}
    for i in range(mo["num_layers"]):
        feed[f"past_key_values.{i}.key"] = feed[f"past_key_values.{i}.value"] = empty
    return feed


def run_cli(capsys, which: str, args: list) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lsaq-run` (which="run") or `lsaq-compile` in process."""
    from lsaq_compile.cli import main as compile_main
    from lsaq_runtime.cli import main as run_main

    if which == "run":
        code = run_main([str(a) for a in args])
    else:
        try:
            compile_main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def ladder_bundles(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Schema 6 bundles with the token tables on the ladder, built once for both exporters'
    tests (read only): the untied tiny Llama with the default profile's INT4 (group 32, zero
    points), and a tied tiny Qwen3 per channel whose fp16-table rung's CPU head is the INT8
    table (cpu_lm_head int8)."""
    from export_helpers import ladder_build

    tmp = tmp_path_factory.mktemp("ladder")
    return {"untied": ladder_build(tiny_llama_dir, tmp / "untied"),
            "tied": ladder_build(make_tiny_family(tmp / "hf-qwen3", "qwen3"), tmp / "tied",
                                 scheme="channel", cpu_lm_head="int8")}

