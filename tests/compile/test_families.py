"""Every supported family end to end, on tiny random models built from transformers configs
(conftest.TINY_FAMILIES): GGUF input (a GGUF written the way llama.cpp's converter writes that
family, read back against the Hugging Face folder and against transformers' own GGUF loader),
measured sensitivity, and a built bundle run by the runtime.

The graph-level parity (prefill plus KV decode, batch 2, FP16 and quantized variants against
the torch reference of the same plan) is in test_export.py; layer-by-layer scoring against a
full forward in test_importance.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lsaq_compile.errors import LsaqError
from lsaq_compile.export_onnx import build_graph, rope_for, save_graph, write_weight_store
from lsaq_compile.model_source import open_model
from lsaq_compile.quantize import schemes_for
from factories.bundles import exact_paper_profile
from factories.models import make_tiny_family

gguf = pytest.importorskip("gguf")

CHANNEL = schemes_for("channel")
GGUF_FAMILIES = ["llama", "llama3", "qwen2", "qwen3", "phi3", "gemma3"]


# ------------------------------------------------------------------ a llama.cpp-style GGUF writer
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: q/k rows into llama.cpp's rotary layout."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _llama3_rope_factors(rs: dict, base: float, dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors: the rope_freqs tensor."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _rope_of(cfg: dict) -> tuple[float, dict | None, float | None]:
    """(rope_theta, scaling with "rope_type", Gemma's local theta) of a config.json written by
    transformers 5 (rope_parameters) or 4 (rope_theta, rope_scaling, rope_local_base_freq)."""
    rp = cfg.get("rope_parameters")
    local = None
    if cfg["model_type"] == "gemma3_text":
        if rp:
            rp, local = rp["full_attention"], rp["sliding_attention"]["rope_theta"]
        else:
            local = cfg["rope_local_base_freq"]
    theta = (rp or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = dict(rp or cfg.get("rope_scaling") or {})
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return theta, (scaling if scaling["rope_type"] != "default" else None), local


def hf_to_gguf(hf_dir: Path, out: Path, eot: int | None = None,
               control: dict[int, str] | None = None) -> Path:
    """Write the Hugging Face folder's model as llama.cpp's converter would (F32 tensors): its
    architecture name and metadata keys, tensor names, q/k permutation for Llama, fused
    attn_qkv / ffn_up and rope factor tensors for Phi-3, (1 + w) norms for Gemma 3, the
    rope_freqs tensor for Llama 3.x RoPE scaling, and the tiny model's BPE tokenizer.
    eot: a tokenizer.ggml.eot_token_id to write; control: padding ids (past the tokenizer's
    vocabulary) written as control tokens with these texts instead."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    cfg = json.loads((hf_dir / "config.json").read_text())
    model_type = cfg["model_type"]
    arch = {"gemma3_text": "gemma3"}.get(model_type, model_type)
    t = load_file(hf_dir / "model.safetensors")
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    theta, scaling, local_theta = _rope_of(cfg)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    if scaling and scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    if arch == "llama" and scaling and scaling["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_rope_factors(scaling, theta, head_dim))
    if arch == "phi3" and scaling:
        orig = cfg["original_max_position_embeddings"]
        scale = cfg["max_position_embeddings"] / orig
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        w.add_tensor("rope_factors_long.weight", np.asarray(scaling["long_factor"], np.float32))
        w.add_tensor("rope_factors_short.weight", np.asarray(scaling["short_factor"], np.float32))
    if arch == "gemma3":
        # raw keys: the oldest gguf package the project allows has no writer methods for them
        w.add_float32(f"{arch}.rope.freq_base_swa", local_theta)
        w.add_array(f"{arch}.attention.sliding_window_pattern",
                    [x == "sliding_attention" for x in cfg["layer_types"]])
        if cfg["query_pre_attn_scalar"] != head_dim:
            w.add_float32(gguf.Keys.Attention.SCALE.format(arch=arch),
                          cfg["query_pre_attn_scalar"] ** -0.5)
        if cfg.get("final_logit_softcapping"):
            w.add_float32(f"{arch}.final_logit_softcapping", cfg["final_logit_softcapping"])
    # tokenizer: the tiny byte-level BPE, as llama.cpp stores a "gpt2" tokenizer
    tok = json.loads(Tokenizer.from_file(str(hf_dir / "tokenizer.json")).to_str())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    control = control or {}
    pads = range(len(vocab), cfg["vocab_size"])
    w.add_token_list([k for k, _ in vocab] + [control.get(i, f"[PAD{i}]") for i in pads])
    w.add_token_types([3 if k in ("<unk>", "<s>", "</s>") else 1 for k, _ in vocab]
                      + [3 if i in control else 5 for i in pads])
    if eot is not None:
        w.add_uint32("tokenizer.ggml.eot_token_id", eot)
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)

    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
    if arch == "gemma3":
        names.update({"post_attention_layernorm": "post_attention_norm",
                      "pre_feedforward_layernorm": "ffn_norm",
                      "post_feedforward_layernorm": "post_ffw_norm"})
    for name, a in t.items():
        a = np.asarray(a, np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1   # Gemma3Model.modify_tensors: llama.cpp multiplies by the norm as stored
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, i, *rest = name.split(".")
            inner, kind = ".".join(rest[:-1]), rest[-1]
            if arch == "llama" and inner in ("self_attn.q_proj", "self_attn.k_proj"):
                a = _permute(a, heads if inner.endswith("q_proj") else kv)
            gname = f"blk.{i}.{names[inner]}.{kind}"
        w.add_tensor(gname, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module", params=GGUF_FAMILIES)
def both(request, tmp_path_factory):
    """(family, HF-folder source, GGUF source) of one tiny model."""
    fam = request.param
    root = tmp_path_factory.mktemp(f"gguf-{fam}")
    d = make_tiny_family(root / "hf", fam)
    return fam, open_model(d), open_model(hf_to_gguf(d, root / f"{fam}.gguf"))


def test_gguf_reads_as_the_hf_folder(both):
    """Same architecture facts and, per layer, the same tensors under the same names: llama.cpp's
    tensor names, permutations, fused tensors and norm offsets are undone."""
    fam, hf, gg = both
    a, b = hf.spec, gg.spec
    for field in ("architecture", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                  "num_kv_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                  "sliding_window", "layer_types", "local_rope_theta", "attention_scale",
                  "final_logit_softcapping", "hidden_act", "embed_scale"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.rms_norm_eps == pytest.approx(b.rms_norm_eps) and a.rope_theta == b.rope_theta
    for i in range(a.num_layers):
        ta, tb = hf.layer_tensors(i), gg.layer_tensors(i)
        assert set(ta) == set(tb)
        for k in ta:
            np.testing.assert_allclose(tb[k], ta[k], rtol=0, atol=1e-6, err_msg=f"{fam} {i} {k}")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        np.testing.assert_allclose(gg.tensor(name), hf.tensor(name), rtol=0, atol=1e-6)
    # the RoPE, whatever form the file gives it (llama.cpp's rope_freqs factors for llama3)
    ra, rb = rope_for(a), rope_for(b)
    np.testing.assert_allclose(rb.inv_freq, ra.inv_freq, rtol=1e-6)
    assert rb.attention_factor == pytest.approx(ra.attention_factor, rel=1e-6)
    assert (rb.long_inv_freq is None) == (ra.long_inv_freq is None) and rb.switch == ra.switch
    if ra.long_inv_freq is not None:
        np.testing.assert_allclose(rb.long_inv_freq, ra.long_inv_freq, rtol=1e-6)


def test_gguf_graph_computes_the_hf_folder_graph(both, tmp_path):
    """The fp32 graphs built from either source give the same logits (prefill of 20 tokens,
    past every family's original RoPE length)."""
    import onnxruntime as ort

    from factories.bundles import empty_cache_feed

    fam, hf, gg = both
    ids = np.random.default_rng(0).integers(3, 512, 20).tolist()
    logits = []
    for src, name in ((hf, "hf"), (gg, "gguf")):
        L = src.spec.num_layers
        index = write_weight_store(src, tmp_path / name, {i: {"fp32"} for i in range(L)}, CHANNEL)
        model, _ = build_graph(src.spec, ["fp32"] * L, index, "float32", 64)
        save_graph(model, tmp_path / name / "g.onnx")
        sess = ort.InferenceSession(str(tmp_path / name / "g.onnx"),
                                    providers=["CPUExecutionProvider"])
        m = {"model": {"num_layers": L, "num_key_value_heads": src.spec.num_kv_heads,
                       "head_dim": src.spec.head_dim}}
        logits.append(sess.run(["logits"], empty_cache_feed(m, ids))[0])
    assert np.abs(logits[0]).max() > 0.5
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fam", ["llama", "qwen3", "phi3", "gemma3"])
def test_transformers_reads_our_gguf_as_the_original(fam, tmp_path):
    """The writer above follows llama.cpp's conventions: transformers' own GGUF loader (an
    independent reading of them) gets the original weights back from its files."""
    from transformers import AutoModelForCausalLM

    # transformers' GGUF config map for qwen3 ignores attention.key_length and keeps Qwen3Config's
    # default head_dim 128 (llama.cpp and our reader use the key, tested above)
    d = make_tiny_family(tmp_path / "hf", fam, **({"head_dim": 128} if fam == "qwen3" else {}))
    path = hf_to_gguf(d, tmp_path / "m.gguf")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                               dtype=torch.float32).state_dict()
    for k, v in ref.items():
        if k == "lm_head.weight" and k not in got:
            continue
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=f"{fam}: {k}")


def test_gguf_bad_inputs_are_clear(tmp_path):
    d = make_tiny_family(tmp_path / "hf", "phi3")
    path = hf_to_gguf(d, tmp_path / "m.gguf")
    # the same file under an architecture no family has
    raw = path.read_bytes().replace(b"phi3", b"phi9")
    (tmp_path / "x.gguf").write_bytes(raw)
    with pytest.raises(LsaqError, match="unsupported GGUF architecture 'phi9'.*gemma3"):
        open_model(tmp_path / "x.gguf")


# ------------------------------------------------------------------ measured sensitivity
@pytest.mark.parametrize("fam", ["qwen3", "phi3", "gemma3", "llama_dynamic"])
def test_sensitivity_meter_agrees_with_reference_models(fam, tmp_path):
    """KLMeter's layer-by-layer arithmetic (the family's embedding scale, RoPE, final norm and
    soft-capping included) against two full transformers models of the plans."""
    from lsaq_compile import sensitivity
    from lsaq_compile.reference import reference_model

    src = open_model(make_tiny_family(tmp_path / "hf", fam))
    schemes = schemes_for("group", 32, symmetric=False)
    windows = np.random.default_rng(2).integers(3, 512, (3, 24))   # past 16: longrope, dynamic
    meter = sensitivity.KLMeter(src, windows, schemes, batch_size=2)
    plan = ["int4", "fp16", "int8/int4", "int4/int8/int8/int4"]
    ids = torch.from_numpy(windows)
    with torch.no_grad():
        p = torch.log_softmax(reference_model(src, ["fp16"] * 4, schemes)(ids).logits[:, :-1], -1)
        lq = torch.log_softmax(reference_model(src, plan, schemes)(ids).logits[:, :-1], -1)
    want = float((p.exp() * (p - lq)).sum(-1).mean())
    assert want > 1e-4
    assert meter.kl(plan) == pytest.approx(want, rel=2e-3, abs=1e-7)
    assert meter.kl(["fp16"] * 4) == 0.0


# ------------------------------------------------------------------ bundles and the runtime
def _tiny_bundle(model, out: Path) -> Path:
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    prof = exact_paper_profile(samples=4, seq_len=32, ladder="paper")
    return build_bundle(model, out, profile=prof, progress=Progress(quiet=True))


@pytest.mark.parametrize("fam", ["qwen3", "phi3", "gemma3", "llama_dynamic", "llama3"])
def test_bundle_runs_in_the_runtime_as_transformers(fam, tmp_path):
    """HF folder -> Jaccard scores -> bundle (FP16, INT8, INT4 mixes) -> the runtime, for three
    variants: greedy generation with the runtime's KV cache gives transformers' greedy tokens
    (generate() with its cache) on the torch reference of the same plan, and the runtime's
    logits of the whole sequence in one prefill equal that reference's. The 26+ tokens pass the
    original RoPE length of longrope and dynamic NTK (16) in both runs."""
    import transformers

    import lsaq_runtime
    from lsaq_compile.reference import reference_model

    d = make_tiny_family(tmp_path / "hf", fam)
    src = open_model(d)
    bundle = _tiny_bundle(d, tmp_path / "bundle")
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["model"]["architecture"] == src.spec.architecture
    # only longrope asks the runtime to rebuild its cache past the original length
    assert m["model"].get("rope_switch_length") == (16 if fam == "phi3" else None)
    assert m["scores"]["metric"] == "jaccard"
    names = [v["name"] for v in m["variants"]]
    assert {"fp16", "int8", "int4"} <= set(names) and len(names) >= 4
    for v in m["variants"]:
        if v["name"] not in ("fp16", "int8", names[-2]):
            continue
        with lsaq_runtime.load(bundle, context=48, device="cpu", variant=v["name"]) as model:
            prompt = model.encode("The capital of France is")
            got = list(model.generate_ids(prompt, 20))
            stop = model.last_stop
            ids = prompt + got
            logits = model.score_tokens(ids)
        ref = reference_model(src, v["precisions"], CHANNEL)
        with torch.no_grad():
            want = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                                eos_token_id=2, pad_token_id=0)[0, len(prompt):].tolist()
            full = ref(torch.tensor([ids])).logits[0].numpy()
            if fam == "phi3":
                # Phi-3's generate() drops its cache when the sequence first passes the original
                # length and prefills again: from then on it is a full recompute at every step.
                # (transformers 4.56 diverges from that one step later; 5 does not.)
                rec = list(prompt)
                for _ in got:
                    rec.append(int(ref(torch.tensor([rec])).logits[0, -1].argmax()))
                assert got == rec[len(prompt):], (fam, v["name"])
                if int(transformers.__version__.split(".")[0]) < 5:
                    continue
        assert got == want[:len(got)], (fam, v["name"])
        assert stop == "eos" or len(got) == 20
        assert len(ids) > 16
        assert np.abs(logits - full).max() <= 1e-3, (fam, v["name"])


@pytest.mark.parametrize("fam", ["qwen3", "llama3", "phi3", "gemma3"])
def test_gguf_bundle_equals_hf_bundle(fam, tmp_path):
    """The same tiny model built from its GGUF file and from its HF folder: same variants, and
    the runtime's logits for the same token ids agree (the GGUF holds the same F32 weights).
    The GGUF bundle's tokenizer is transformers' conversion of the file's (its details vary
    with the transformers version); it must round-trip text."""
    import transformers

    import lsaq_runtime

    # transformers 4's GGUF tokenizer converters expect each family's real vocabulary (qwen3's
    # special tokens, phi3's and gemma3's sentencepiece scores), not the tiny byte-level BPE
    old = int(transformers.__version__.split(".")[0]) < 5
    if old and fam in ("qwen3", "gemma3"):
        pytest.skip("transformers 4 cannot convert the tiny BPE vocabulary for this family")
    d = make_tiny_family(tmp_path / "hf", fam)
    path = hf_to_gguf(d, tmp_path / f"{fam}.gguf")
    a = _tiny_bundle(d, tmp_path / "from-hf")
    b = _tiny_bundle(path, tmp_path / "from-gguf")
    ma, mb = (json.loads((x / "manifest.json").read_text()) for x in (a, b))
    assert mb["model"]["source"]["kind"] == "gguf"
    assert mb["model"]["architecture"] == ma["model"]["architecture"]
    assert [v["name"] for v in ma["variants"]] == [v["name"] for v in mb["variants"]]
    text = "The capital of France is Paris, and the capital of Italy"
    ids = None
    for v in ("fp16", "int4"):
        out = []
        for bundle in (a, b):
            with lsaq_runtime.load(bundle, context=48, device="cpu", variant=v) as model:
                ids = ids or model.encode(text)
                assert old or text in model.codec.decode(model.encode(text))
                out.append(model.score_tokens(ids))
        assert len(ids) > 8
        np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-4)


def test_end_of_turn_ids_come_from_the_source(tmp_path):
    """A chat answer must stop at the end of its turn, not only at the document EOS: a GGUF's
    tokenizer.ggml.eot_token_id, else (as llama.cpp) a control token whose text ends a turn
    (Gemma's <end_of_turn>, ChatML's <|im_end|>); an HF folder's generation_config.json
    eos_token_id list (Llama 3 Instruct: <|eot_id|>)."""
    from factories.models import make_tiny_model, save_tiny_tokenizer

    d = make_tiny_model(tmp_path / "hf", vocab_size=520)
    save_tiny_tokenizer(d, 512)           # ids 512..519 are the model's padding rows
    named = open_model(hf_to_gguf(d, tmp_path / "eot.gguf", eot=7))
    assert named.saved_tokenizer()[1]["eos_token_ids"] == [2, 7]
    by_text = open_model(hf_to_gguf(d, tmp_path / "text.gguf",
                                    control={515: "<end_of_turn>", 516: "<start_of_turn>"}))
    assert by_text.saved_tokenizer()[1]["eos_token_ids"] == [2, 515]
    plain = open_model(hf_to_gguf(d, tmp_path / "plain.gguf"))
    assert plain.saved_tokenizer()[1]["eos_token_ids"] == [2]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9, 11]}))
    assert open_model(d).saved_tokenizer()[1]["eos_token_ids"] == [2, 9, 11]
