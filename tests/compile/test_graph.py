"""Weight store + ONNX graphs against transformers, on tiny random models of every supported
family (Llama with llama3 and dynamic-NTK RoPE, Mistral, Qwen2, Qwen3, Phi-3 with longrope,
Gemma 3).

Every graph is checked with onnx.checker (full check), loaded in ONNX Runtime (CPU), and run as
a prefill of 10 tokens followed by 8 decode steps that feed `present` back as `past`; its logits
are compared with transformers run over all 18 tokens at once, or, for RoPEs whose frequencies
depend on the sequence length (longrope, dynamic NTK), with transformers run the same way
(prefill, then one token at a time with its KV cache): there a cached key keeps the rotation
of the step that made it, so a full recompute is a different computation.
"""

from __future__ import annotations

import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from lsaq_compile.errors import LsaqError
from lsaq_compile.export_onnx import (
    EMBED, FUSED, LM_HEAD, STORED_LINEARS, act_key, build_graph, effective_linear_weight, linear_keys,
    rope_for, rope_inv_freq, save_graph, write_weight_store)
from lsaq_compile.model_source import open_model
from lsaq_compile.quantize import quantize, schemes_for
from lsaq_compile.reference import reference_model

PREFILL, STEPS, BATCH, MAX_CONTEXT = 10, 8, 2, 64
ALL = {"fp32", "fp16", "int8", "int4"}
CHANNEL = schemes_for("channel")
GROUP = schemes_for("group", 32, symmetric=False)   # int4 with zero points; K=96 -> 3 blocks

# Shapes chosen to exercise different MatMulNBits blocks (K = 64, 96, 160) and GQA grouping.
CONFIGS = {
    "llama": dict(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=128,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(arch="MistralForCausalLM", hidden_size=96, intermediate_size=160,
                    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                    head_dim=16, tie_word_embeddings=False, sliding_window=5,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(arch="Qwen2ForCausalLM", hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True, rope_theta=1e6,
                  rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 32}),
    # Dynamic NTK: the base grows once the sequence passes max_position_embeddings (12): the
    # prefill (10) uses the original frequencies, decode steps 13..18 new ones every step.
    "llama_dynamic": dict(arch="LlamaForCausalLM", hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=False, max_position_embeddings=12,
                          rope_scaling={"rope_type": "dynamic", "factor": 4.0}),
    # q/k RMSNorm per head, head_dim 32 != hidden / heads (q is 128 wide, o_proj 128 -> 64).
    "qwen3": dict(arch="Qwen3ForCausalLM", hidden_size=64, intermediate_size=96,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=True, rope_theta=1e6),
    # Fused qkv / gate_up, a sliding window on every layer, longrope: short factors up to the
    # original 12 positions, long ones (and the attention factor) past them. (Only these three
    # rope_scaling keys: transformers 4's Phi-3 config accepts no others.)
    "phi3": dict(arch="Phi3ForCausalLM", hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=False, sliding_window=7, original_max_position_embeddings=12,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 rope_scaling={"type": "longrope",
                               "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.8],
                               "long_factor": [1.0, 1.3, 1.9, 2.8, 4.0, 6.0, 9.0, 14.0]}),
    # Sliding (window 5, local base 1e4) and global layers (base 1e6, linear x4), four norms
    # a layer, q/k norms, GELU-tanh, sqrt(hidden) embeddings, tied head, logit soft-capping,
    # query_pre_attn_scalar != head_dim.
    "gemma3": dict(arch="Gemma3ForCausalLM", hidden_size=64, intermediate_size=96,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                   sliding_window=5, rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling={"rope_type": "linear", "factor": 4.0},
                   query_pre_attn_scalar=24, final_logit_softcapping=4.0),
}
# Families whose RoPE frequencies depend on the sequence length (see the module docstring).
LENGTH_DEPENDENT = {"llama_dynamic", "phi3"}


def make_tiny_model(path: Path, name: str, **overrides):
    """Save a random model whose logits are of order 1 (initializer_range 0.125), with
    non-trivial norms and biases, and embeddings already fp16-exact so the all-fp32 graph can
    be compared with transformers on the very same weights."""
    import transformers

    kw = {"max_position_embeddings": 128, **CONFIGS[name], **overrides}
    arch = kw.pop("arch")
    cls = getattr(transformers, arch)
    cfg = cls.config_class(vocab_size=300, initializer_range=0.125, **kw)
    torch.manual_seed(zlib.crc32(name.encode()))
    model = cls(cfg).eval()
    # Gemma's norms scale by (1 + w): the same spread of factors around 1
    norm_center = 0.0 if arch == "Gemma3ForCausalLM" else 1.0
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(norm_center + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif pname in (EMBED, LM_HEAD):
                p.copy_(p.half().float())
    model.save_pretrained(path, safe_serialization=True)
    return model


def torch_logits(model, ids: np.ndarray, cached: bool) -> np.ndarray:
    """Logits of a transformers model for all positions of ids: one forward over everything,
    or (cached) a prefill of PREFILL tokens and then one token a step with its KV cache, as the
    graphs run."""
    x = torch.from_numpy(ids)
    with torch.no_grad():
        if not cached:
            return model(x).logits.float().numpy()
        out = model(x[:, :PREFILL], use_cache=True)
        logits = [out.logits]
        for t in range(PREFILL, x.shape[1]):
            out = model(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1).float().numpy()


@dataclass
class Tiny:
    name: str
    source: object
    hf: object
    channel: dict            # store index, every layer at every precision, channel schemes
    channel_dir: Path
    group: dict              # store index, int8/int4 with group-wise asymmetric int4
    group_dir: Path
    ids: np.ndarray
    hf_logits: np.ndarray    # transformers on all PREFILL + STEPS tokens

    @property
    def layers(self) -> int:
        return self.source.spec.num_layers


@pytest.fixture(scope="module", params=list(CONFIGS))
def tiny(request, tmp_path_factory) -> Tiny:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    hf = make_tiny_model(root / "hf", name)
    source = open_model(root / "hf")
    L = source.spec.num_layers
    channel = write_weight_store(source, root / "channel", {i: ALL for i in range(L)}, CHANNEL)
    group = write_weight_store(source, root / "group", {i: {"int8", "int4"} for i in range(L)},
                               GROUP)
    ids = np.random.default_rng(1).integers(0, 300, (BATCH, PREFILL + STEPS))
    hf_logits = torch_logits(hf, ids, name in LENGTH_DEPENDENT)
    # transformers' dynamic-NTK module keeps the frequencies of the longest sequence it saw:
    # later users get a model that has seen nothing
    hf = type(hf).from_pretrained(root / "hf").eval()
    return Tiny(name, source, hf, channel, root / "channel", group, root / "group", ids,
                hf_logits)


def export(tiny: Tiny, precisions, dtype: str, group: bool = False):
    index, root = (tiny.group, tiny.group_dir) if group else (tiny.channel, tiny.channel_dir)
    model, info = build_graph(tiny.source.spec, list(precisions), index, dtype, MAX_CONTEXT)
    path = root / f"{'-'.join(precisions)}.{dtype}.onnx"
    save_graph(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, info, path


def _feed(spec, ids, past_len, n_keep, past, dtype):
    total = past_len + ids.shape[1]
    feed = {"input_ids": np.ascontiguousarray(ids),
            "seqlens_k": np.full(ids.shape[0], total - 1, np.int32),
            "total_sequence_length": np.array(total, np.int32),
            "num_logits_to_keep": np.array(n_keep, np.int64)}
    for i in range(spec.num_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = past.get(
                (i, kv), np.zeros((ids.shape[0], spec.num_kv_heads, 0, spec.head_dim), dtype))
    return feed


def generate(session, spec, ids, dtype: str) -> np.ndarray:
    """Logits [batch, PREFILL + STEPS, vocab]: prefill (all positions), then one token a step
    with the KV cache fed back."""
    np_dtype = np.float32 if dtype == "float32" else np.float16
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, _feed(spec, ids[:, :PREFILL], 0, 0, {}, np_dtype))))
    logits = [out["logits"]]
    for t in range(PREFILL, ids.shape[1]):
        past = {(i, kv): out[f"present.{i}.{kv}"]
                for i in range(spec.num_layers) for kv in ("key", "value")}
        out = dict(zip(names, session.run(None, _feed(spec, ids[:, t:t + 1], t, 1, past,
                                                      np_dtype))))
        assert out["logits"].shape == (ids.shape[0], 1, spec.vocab_size)
        assert out["present.0.key"].shape == (ids.shape[0], spec.num_kv_heads, t + 1, spec.head_dim)
        logits.append(out["logits"])
    return np.concatenate(logits, axis=1)


def reference_logits(tiny: Tiny, precisions, schemes, dtype=torch.float32) -> np.ndarray:
    model = reference_model(tiny.source, list(precisions), schemes, dtype=dtype)
    return torch_logits(model, tiny.ids, tiny.name in LENGTH_DEPENDENT)


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# --------------------------------------------------------------------------------------------
# Parity

def test_fp32_graph_matches_transformers(tiny):
    session, _, _ = export(tiny, ["fp32"] * tiny.layers, "float32")
    got = generate(session, tiny.source.spec, tiny.ids, "float32")
    assert got.dtype == np.float32
    assert np.abs(tiny.hf_logits).max() > 1.0   # the tolerance below means something
    assert max_diff(got, tiny.hf_logits) <= 1e-3
    # The reference model with fp32 layers is the transformers model itself.
    assert max_diff(reference_logits(tiny, ["fp32"] * tiny.layers, CHANNEL), tiny.hf_logits) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_interface_is_the_bundle_format_table(tiny, dtype):
    session, _, path = export(tiny, ["fp16"] * tiny.layers, dtype)
    spec = tiny.source.spec
    t = "tensor(float)" if dtype == "float32" else "tensor(float16)"
    kv = [spec.num_kv_heads, spec.head_dim]
    want_in = [("input_ids", "tensor(int64)", 2), ("seqlens_k", "tensor(int32)", 1),
               ("total_sequence_length", "tensor(int32)", 0),
               ("num_logits_to_keep", "tensor(int64)", 0)]
    want_out = [("logits", "tensor(float)", 3)]
    for i in range(spec.num_layers):
        want_in += [(f"past_key_values.{i}.{x}", t, 4) for x in ("key", "value")]
        want_out += [(f"present.{i}.{x}", t, 4) for x in ("key", "value")]
    assert [(a.name, a.type, len(a.shape)) for a in session.get_inputs()] == want_in
    assert [(a.name, a.type, len(a.shape)) for a in session.get_outputs()] == want_out
    past = session.get_inputs()[4].shape
    assert [past[1], past[3]] == kv
    model = onnx.load(str(path), load_external_data=False)
    assert model.ir_version == 10
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 21), ("com.microsoft", 1)}
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "Gemm"} <= ops
    assert path.stat().st_size < 200_000   # no weights inside


def test_num_logits_to_keep_slices_last_positions(tiny):
    session, _, _ = export(tiny, ["fp32"] * tiny.layers, "float32")
    spec = tiny.source.spec
    ids = tiny.ids[:, :PREFILL]
    for n in (1, 3):
        logits = session.run(["logits"], _feed(spec, ids, 0, n, {}, np.float32))[0]
        assert logits.shape == (BATCH, n, spec.vocab_size)
        assert max_diff(logits, tiny.hf_logits[:, PREFILL - n:PREFILL]) <= 1e-3


def test_fp16_weights_in_float32_graph(tiny):
    precisions = ["fp16"] * tiny.layers
    session, _, _ = export(tiny, precisions, "float32")
    got = generate(session, tiny.source.spec, tiny.ids, "float32")
    assert max_diff(got, reference_logits(tiny, precisions, CHANNEL)) <= 1e-3


def test_float16_graph(tiny):
    """The CUDA-flavoured graph (float16 activations), run on CPU. Its error comes from fp16
    rounding of activations, so it is bounded relative to what torch itself loses when it runs
    the same model in float16: at most 2x that, plus two fp16 unit roundoffs of the logits'
    scale. (Measured: 0.6x to 1x torch's error.)"""
    precisions = ["fp16"] * tiny.layers
    session, _, _ = export(tiny, precisions, "float16")
    got = generate(session, tiny.source.spec, tiny.ids, "float16")
    assert got.dtype == np.float32
    ref = reference_logits(tiny, precisions, CHANNEL)
    torch_fp16_err = max_diff(reference_logits(tiny, precisions, CHANNEL, torch.float16), ref)
    tol = 2 * torch_fp16_err + 2 * 2.0 ** -11 * np.abs(ref).max()
    assert max_diff(got, ref) <= tol


QUANTIZED = [
    ("int8", False), ("int4", False), ("int4", True), ("mixed", False), ("mixed", True)]


@pytest.mark.parametrize("variant,group", QUANTIZED,
                         ids=[f"{v}-{'group' if g else 'channel'}" for v, g in QUANTIZED])
def test_quantized_graph_matches_reference(tiny, variant, group):
    L = tiny.layers
    if variant == "mixed":
        cycle = ["int4", "int8"] if group else ["int8", "int4", "fp16"]
        precisions = [cycle[i % len(cycle)] for i in range(L)]
    else:
        precisions = [variant] * L
    schemes = GROUP if group else CHANNEL
    session, _, _ = export(tiny, precisions, "float32", group=group)
    got = generate(session, tiny.source.spec, tiny.ids, "float32")
    ref = reference_logits(tiny, precisions, schemes)
    assert max_diff(got, ref) <= 1e-3
    # Quantization must actually change the model (the weights reached the graph).
    assert max_diff(ref, tiny.hf_logits) > 1e-3


def test_quantized_float16_graph(tiny):
    precisions = [["int8", "int4"][i % 2] for i in range(tiny.layers)]
    session, _, _ = export(tiny, precisions, "float16", group=True)
    got = generate(session, tiny.source.spec, tiny.ids, "float16")
    ref = reference_logits(tiny, precisions, GROUP)
    torch_fp16_err = max_diff(reference_logits(tiny, precisions, GROUP, torch.float16), ref)
    assert max_diff(got, ref) <= 2 * torch_fp16_err + 2 * 2.0 ** -11 * np.abs(ref).max()


@pytest.mark.parametrize("tables,dtype", [(("int8", "int4"), "float32"),
                                          (("int4", "int8"), "float16")],
                         ids=["embed8-head4-float32", "embed4-head8-float16"])
def test_quantized_tables_match_reference(tiny, tmp_path, tables, dtype):
    """The embedding table and LM head on the ladder: the graph gathers rows of the quantized
    table (dequantized with standard ops) and runs the head as MatMulNBits over the same codes;
    a tied model has one table for both. Against the torch reference with the same tables."""
    spec = tiny.source.spec
    tied = spec.tie_word_embeddings or not tiny.source.has_tensor(LM_HEAD)
    embed, head = (tables[0], tables[0]) if tied else tables
    tp = {"embed_tokens": {embed}, **({} if tied else {"lm_head": {head}})}
    L = tiny.layers
    index = write_weight_store(tiny.source, tmp_path, {i: {"int8"} for i in range(L)}, GROUP,
                               table_precisions=tp)
    model, info = build_graph(spec, ["int8"] * L, index, dtype, MAX_CONTEXT, lm_head=head,
                              embed=embed)
    path = tmp_path / f"tables.{dtype}.onnx"
    save_graph(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    # the float tables are not read at all: the quantized codes replace them
    assert EMBED not in info.referenced and LM_HEAD not in info.referenced
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = generate(session, spec, tiny.ids, dtype)
    rm = lambda d: reference_model(tiny.source, ["int8"] * L, GROUP, dtype=d,  # noqa: E731
                                   tables={"embed_tokens": embed, "lm_head": head})
    ref = torch_logits(rm(torch.float32), tiny.ids, tiny.name in LENGTH_DEPENDENT)
    if dtype == "float32":
        assert max_diff(got, ref) <= 1e-3
    else:
        t16 = torch_logits(rm(torch.float16), tiny.ids, tiny.name in LENGTH_DEPENDENT)
        assert max_diff(got, ref) <= 2 * max_diff(t16, ref) + 2 * 2.0 ** -11 * np.abs(ref).max()
    # the tables' quantization changed the model: the reference with float tables differs
    plain = reference_logits(tiny, ["int8"] * L, GROUP)
    assert max_diff(ref, plain) > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("group", [False, True], ids=["channel", "group"])
def test_matmulnbits_nodes_avoid_the_ort_pitfalls(tiny, dtype, group):
    """Scales are initializers of the activation dtype (a Cast feeding them gives wrong results
    at accuracy_level 4 in ORT), every node has the accuracy level asked for, zero points only
    for asymmetric schemes."""
    model, _ = build_graph(tiny.source.spec, ["int4"] * tiny.layers,
                           tiny.group if group else tiny.channel, dtype, MAX_CONTEXT,
                           accuracy_level=4)
    inits = {t.name: t for t in model.graph.initializer}
    want = onnx.TensorProto.FLOAT if dtype == "float32" else onnx.TensorProto.FLOAT16
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 4 * tiny.layers            # qkv, o, gate_up, down
    for n in nodes:
        assert {a.name: a.i for a in n.attribute}["accuracy_level"] == 4
        assert inits[n.input[1]].data_location == onnx.TensorProto.EXTERNAL
        assert inits[n.input[2]].data_type == want
        assert len(n.input) == (4 if group else 3)


def test_kv_cache_in_shared_buffer(tiny):
    """Past and present bound to one preallocated buffer of capacity > total (IOBinding): GQA
    writes the new entries in place and the logits are those of the plain run."""
    precisions = ["int4"] * tiny.layers
    session, _, _ = export(tiny, precisions, "float32")
    spec = tiny.source.spec
    plain = generate(session, spec, tiny.ids, "float32")
    capacity = 32
    bufs = {(i, kv): ort.OrtValue.ortvalue_from_numpy(
        np.zeros((BATCH, spec.num_kv_heads, capacity, spec.head_dim), np.float32))
        for i in range(spec.num_layers) for kv in ("key", "value")}
    got = []
    for lo, hi in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, PREFILL + STEPS)]:
        io = session.io_binding()
        feed = _feed(spec, tiny.ids[:, lo:hi], lo, 0 if lo == 0 else 1, {}, np.float32)
        for k, v in feed.items():
            if not k.startswith("past_key_values"):
                io.bind_cpu_input(k, v)
        for (i, kv), buf in bufs.items():
            io.bind_ortvalue_input(f"past_key_values.{i}.{kv}", buf)
            io.bind_ortvalue_output(f"present.{i}.{kv}", buf)
        io.bind_output("logits")
        session.run_with_iobinding(io)
        got.append(io.get_outputs()[-1].numpy())
    assert bufs[0, "key"].shape() == [BATCH, spec.num_kv_heads, capacity, spec.head_dim]
    assert max_diff(np.concatenate(got, axis=1), plain) == 0.0


# --------------------------------------------------------------------------------------------
# Store and GraphInfo

def test_store_holds_each_tensor_once_with_exact_bytes(tiny):
    spec = tiny.source.spec
    files = {}
    for key, ref in tiny.channel.items():
        files.setdefault(ref.file, []).append((key, ref))
    assert sorted(files) == ["weights/float.safetensors", "weights/int4.safetensors",
                             "weights/int8.safetensors"]
    for rel, entries in files.items():
        path = tiny.channel_dir / rel
        raw = path.read_bytes()
        data_start = 8 + int.from_bytes(raw[:8], "little")
        # Each tensor once: the refs tile the data section exactly, without overlap.
        spans = sorted((r.offset, r.offset + r.length) for _, r in entries)
        assert spans[0][0] == data_start and spans[-1][1] == len(raw)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        with safe_open(str(path), framework="numpy") as f:
            assert set(f.keys()) == {k for k, _ in entries}
            for key, ref in entries:
                a = f.get_tensor(key)
                assert (a.dtype.name, a.shape, a.nbytes) == (ref.dtype, ref.shape, ref.length)
                assert raw[ref.offset:ref.offset + ref.length] == a.tobytes()
    # Tied embeddings are stored once; an untied LM head gets its own fp16 tensor.
    assert tiny.channel[EMBED].dtype == "float16"
    assert (LM_HEAD in tiny.channel) == (not spec.tie_word_embeddings)
    # Stored linear weights are what the graph's math assumes.
    w = tiny.source.tensor("model.layers.1.mlp.down_proj.weight")
    with safe_open(str(tiny.channel_dir / "weights/float.safetensors"), framework="numpy") as f:
        kn = f.get_tensor(linear_keys(1, "mlp.down_proj", "fp16", None)["weight"])
        np.testing.assert_array_equal(kn, w.T.astype(np.float16))
    keys = linear_keys(1, "mlp.down_proj", "int4", CHANNEL["int4"])
    with safe_open(str(tiny.channel_dir / "weights/int4.safetensors"), framework="numpy") as f:
        q = quantize(w, CHANNEL["int4"])
        np.testing.assert_array_equal(f.get_tensor(keys["qweight"]), q.packed)
        np.testing.assert_array_equal(f.get_tensor(keys["scales"]), q.scales)
        np.testing.assert_array_equal(f.get_tensor(keys["scales_f32"]),
                                      q.scales.astype(np.float32))
    # Fused q|k|v: exactly the three weights quantized one by one, stacked by output rows
    # (per-row scales), so one MatMulNBits computes the same as three.
    parts = [quantize(tiny.source.tensor(f"model.layers.1.self_attn.{n}.weight"), CHANNEL["int4"])
             for n in ("q_proj", "k_proj", "v_proj")]
    keys = linear_keys(1, "self_attn.qkv_proj", "int4", CHANNEL["int4"])
    with safe_open(str(tiny.channel_dir / "weights/int4.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor(keys["qweight"]),
                                      np.concatenate([q.packed for q in parts]))
        np.testing.assert_array_equal(f.get_tensor(keys["scales"]),
                                      np.concatenate([q.scales for q in parts]))


def test_store_writes_only_files_that_get_tensors(tmp_path):
    make_tiny_model(tmp_path / "hf", "llama", num_hidden_layers=2)
    source = open_model(tmp_path / "hf")
    index = write_weight_store(source, tmp_path / "b", {0: {"fp16"}, 1: {"fp16"}}, CHANNEL)
    assert sorted(p.name for p in (tmp_path / "b/weights").iterdir()) == ["float.safetensors"]
    assert {r.file for r in index.values()} == {"weights/float.safetensors"}


def test_graph_info_accounts_for_referenced_bytes(tiny):
    spec = tiny.source.spec
    hd2 = spec.head_dim // 2
    for precisions, dtype in ((["int8"] * tiny.layers, "float32"),
                              (["fp16"] * tiny.layers, "float32"),
                              (["fp16"] * tiny.layers, "float16")):
        model, info = build_graph(spec, precisions, tiny.channel, dtype, MAX_CONTEXT)
        inits = {t.name: t for t in model.graph.initializer}
        assert set(info.referenced) == set(inits)
        assert info.weight_bytes == sum(info.referenced.values())
        for name, t in inits.items():
            ref = tiny.channel[name]
            ext = {e.key: e.value for e in t.external_data}
            assert t.data_location == onnx.TensorProto.EXTERNAL and not t.raw_data
            assert (ext["location"], int(ext["offset"]), int(ext["length"])) == (
                ref.file, ref.offset, ref.length)
            assert info.referenced[name] == ref.length
        size = 4 if dtype == "float32" else 2
        # cos and sin of every rotary table ORT folds (Gemma 3: two; longrope and dynamic NTK
        # compute theirs each run)
        kinds = {spec.uses_local_rope(i) for i in range(spec.num_layers)}
        folded = sum(not rope_for(spec, local).length_dependent for local in kinds)
        assert folded == {"gemma3": 2, "phi3": 0, "llama_dynamic": 0}.get(tiny.name, 1)
        cache = folded * 2 * MAX_CONTEXT * hd2 * size
        per_layer = []
        for i, p in enumerate(precisions):
            keys = [k for lin in STORED_LINEARS
                    for role, k in linear_keys(i, lin, p, CHANNEL.get(p)).items()
                    if role != ("scales" if dtype == "float32" else "scales_f32")]
            per_layer.append(sum(tiny.channel[k].length for k in keys))
        assert info.decoder_linear_bytes == per_layer
        # The CPU graph upcasts each fp16 MatMul/Gemm weight to a float32 copy (2x its bytes);
        # the table Gather reads stays memory-mapped there (0x), on CUDA it is held once.
        head = tiny.channel[EMBED if spec.tie_word_embeddings else LM_HEAD].length
        embed = tiny.channel[EMBED].length
        extra = 0
        if dtype == "float32":
            extra += head if spec.tie_word_embeddings else head - embed
            if precisions[0] == "fp16":
                extra += sum(per_layer)
        assert info.resident_bytes == info.weight_bytes + cache + extra


def test_weight_store_works_layer_by_layer(tmp_path):
    """Peak numpy memory while storing stays near one layer plus the embeddings, far below the
    whole model in float32. (Layers are made large enough that per-tensor bookkeeping, which
    does grow with the model, is negligible.)"""
    make_tiny_model(tmp_path / "hf", "llama", num_hidden_layers=8, hidden_size=256,
                    intermediate_size=512)
    source = open_model(tmp_path / "hf")
    spec = source.spec
    layer_f32 = 4 * sum(a.size for a in source.layer_tensors(0).values())
    embed_f32 = 4 * spec.vocab_size * spec.hidden_size
    tracemalloc.start()
    try:
        write_weight_store(source, tmp_path / "b", {i: ALL for i in range(spec.num_layers)},
                           GROUP)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * layer_f32 + 2 * embed_f32
    assert peak < 0.4 * (spec.num_layers * layer_f32 + 2 * embed_f32)


# --------------------------------------------------------------------------------------------
# RoPE and errors

def test_rope_inv_freq_matches_transformers(tiny):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = tiny.source.spec
    model = reference_model(tiny.source, ["fp32"] * tiny.layers, CHANNEL)
    rotary = model.model.rotary_emb
    inv_freq, factor = rope_inv_freq(spec)
    if tiny.name == "gemma3":  # one RoPE per layer type: one module (transformers 5) or two (4)
        glob, loc = ((rotary.full_attention_inv_freq, rotary.sliding_attention_inv_freq)
                     if hasattr(rotary, "full_attention_inv_freq")
                     else (rotary.inv_freq, model.model.rotary_emb_local.inv_freq))
        np.testing.assert_allclose(inv_freq, glob.numpy(), rtol=1e-6)
        np.testing.assert_allclose(rope_for(spec, local=True).inv_freq, loc.numpy(), rtol=1e-6)
        assert spec.uses_local_rope(0) and not spec.uses_local_rope(1)
        return
    np.testing.assert_allclose(inv_freq, rotary.inv_freq.numpy(), rtol=1e-6)
    assert factor == pytest.approx(rotary.attention_scaling, rel=1e-7)
    if tiny.name in ("qwen2", "phi3"):
        assert factor > 1.0   # yarn's and longrope's attention factors are exercised
    if tiny.name == "phi3":   # the frequencies past the original length
        orig = spec.rope_scaling["original_max_position_embeddings"]
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=orig + 1)
        rope = rope_for(spec)
        np.testing.assert_allclose(rope.long_inv_freq, long.numpy(), rtol=1e-6)
        assert rope.switch == orig == 12 and max_diff(rope.long_inv_freq, inv_freq) > 1e-3


def test_effective_weight_is_the_dequantized_store(tiny):
    w = tiny.source.tensor("model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_array_equal(effective_linear_weight(w, "int4", GROUP),
                                  quantize(w, GROUP["int4"]).dequantize())
    np.testing.assert_array_equal(effective_linear_weight(w, "fp16", GROUP),
                                  w.astype(np.float16).astype(np.float32))


def test_user_errors_are_clear(tiny):
    spec, L = tiny.source.spec, tiny.layers
    with pytest.raises(LsaqError, match="precision"):
        write_weight_store(tiny.source, tiny.channel_dir / "x", {i: {"int3"} for i in range(L)},
                           CHANNEL)
    with pytest.raises(LsaqError, match="no precision given"):
        write_weight_store(tiny.source, tiny.channel_dir / "x", {0: {"fp16"}}, CHANNEL)
    with pytest.raises(LsaqError, match="scheme"):
        write_weight_store(tiny.source, tiny.channel_dir / "x", {i: {"int4"} for i in range(L)},
                           {"int4": CHANNEL["int8"]})
    with pytest.raises(LsaqError, match="weight store lacks"):
        build_graph(spec, ["fp16"] * L, tiny.group, "float32", MAX_CONTEXT)
    with pytest.raises(LsaqError, match="precisions given"):
        build_graph(spec, ["fp16"], tiny.channel, "float32", MAX_CONTEXT)
    with pytest.raises(LsaqError, match="dtype"):
        build_graph(spec, ["fp16"] * L, tiny.channel, "bfloat16", MAX_CONTEXT)


def test_unsupported_rope_scaling_is_refused(tmp_path):
    import json

    make_tiny_model(tmp_path / "hf", "llama")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "mrope", "factor": 2.0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LsaqError, match="RoPE scaling 'mrope' is not supported"):
        open_model(tmp_path / "hf")


@pytest.mark.parametrize("name,overrides,match", [
    ("phi3", {"partial_rotary_factor": 0.5, "rope_scaling": None},
     "partial rotary embeddings .*0.5"),
    ("gemma3", {"use_bidirectional_attention": True}, "bidirectional attention"),
    ("gemma3", {"hidden_activation": "gelu"}, "activation 'gelu' is not supported"),
    ("qwen3", {"attention_bias": True}, "o_proj biases are not supported"),
])
def test_unsupported_family_features_are_refused(tmp_path, name, overrides, match):
    """What the graph does not compute is refused by name, before anything is written."""
    make_tiny_model(tmp_path / "hf", name, **overrides)
    source = open_model(tmp_path / "hf")
    with pytest.raises(LsaqError, match=match):
        write_weight_store(source, tmp_path / "b", {i: {"fp16"} for i in range(3)}, CHANNEL)
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------
# Activation-weighted clipping (quantization clip "mse-act")

MSE_ACT = schemes_for("group", 32, symmetric=False, clip="mse-act")


def _hf_input_stats(hf, ids: np.ndarray) -> dict[str, np.ndarray]:
    """mean x^2 per input feature of each stored linear, straight from the transformers model."""
    sums, handles = {}, []
    for i, layer in enumerate(hf.model.layers):
        for lin, members in FUSED.items():
            def hook(module, args, key=act_key(i, lin)):
                sums[key] = args[0].reshape(-1, args[0].shape[-1]).double().square().mean(0)
            # Phi-3's q/k/v and gate/up are one fused module each
            module = members[0] if hasattr(layer.get_submodule(members[0].split(".")[0]),
                                           members[0].split(".")[1]) else lin
            handles.append(layer.get_submodule(module).register_forward_pre_hook(hook))
    with torch.no_grad():
        hf(torch.from_numpy(ids))
    for h in handles:
        h.remove()
    return {k: v.numpy() for k, v in sums.items()}


def test_mse_act_store_and_graph_match_reference(tiny, tmp_path):
    """Activation statistics (layer by layer) equal the full model's; the store is quantized
    with them, and the graph computes exactly the torch reference built with the same ones."""
    from lsaq_compile.activations import activation_stats

    L = tiny.layers
    windows = np.random.default_rng(7).integers(0, 300, (3, 16))
    stats = activation_stats(tiny.source, windows, batch_size=2)
    want = _hf_input_stats(tiny.hf, windows)
    assert set(stats) == {act_key(i, lin) for i in range(L) for lin in STORED_LINEARS} == set(want)
    for key, v in stats.items():
        assert v.dtype == np.float32 and v.shape == want[key].shape
        np.testing.assert_allclose(v, want[key], rtol=2e-4, atol=1e-9, err_msg=key)

    with pytest.raises(LsaqError, match="mse-act.*activation statistics"):
        write_weight_store(tiny.source, tmp_path / "none", {i: {"int4"} for i in range(L)}, MSE_ACT)
    index = write_weight_store(tiny.source, tmp_path / "b", {i: {"int8", "int4"} for i in range(L)},
                               MSE_ACT, act_stats=stats)
    # The stored codes are those of the act-weighted search, not of the unweighted one.
    w = np.concatenate([tiny.source.tensor(f"model.layers.1.mlp.{m}.weight")
                        for m in ("gate_proj", "up_proj")])
    keys = linear_keys(1, "mlp.gate_up_proj", "int4", MSE_ACT["int4"])
    q = quantize(w, MSE_ACT["int4"], act=stats[act_key(1, "mlp.gate_up_proj")])
    plain = quantize(w, schemes_for("group", 32, symmetric=False, clip="mse")["int4"])
    with safe_open(str(tmp_path / "b" / "weights/int4.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor(keys["qweight"]), q.packed)
        np.testing.assert_array_equal(f.get_tensor(keys["scales"]), q.scales)
    assert not np.array_equal(q.packed, plain.packed)

    for precisions in (["int4"] * L, [["int8", "int4"][i % 2] for i in range(L)]):
        model, _ = build_graph(tiny.source.spec, precisions, index, "float32", MAX_CONTEXT)
        path = tmp_path / "b" / "g.onnx"
        save_graph(model, path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = generate(session, tiny.source.spec, tiny.ids, "float32")
        ref_model = reference_model(tiny.source, precisions, MSE_ACT, act_stats=stats)
        ref = torch_logits(ref_model, tiny.ids, tiny.name in LENGTH_DEPENDENT)
        assert max_diff(got, ref) <= 1e-3
        # ... and the statistics matter: without them (unweighted search) the logits differ
        other = reference_logits(tiny, precisions, schemes_for("group", 32, symmetric=False,
                                                               clip="mse"))
        assert max_diff(other, ref) > 1e-2


def test_mse_act_bundle_matches_its_torch_reference(tiny_llama_dir, tmp_path):
    """A bundle built with clip = "mse-act": the manifest records the clip and its calibration,
    and the INT4 graph matches the torch reference rebuilt from that record."""
    from lsaq_compile import evaluate as ev
    from lsaq_compile.bundle import build_bundle, read_manifest
    from lsaq_compile.profiles import Profile
    from lsaq_compile.progress import Progress

    prof = Profile(name="test")
    prof.build.ladder, prof.build.providers = "paper", ["cpu"]
    # A file, not the built-in text: that one depends on which modules the process has
    # imported (transformers adds logging.Logger.warning_advice), so its fingerprint can differ.
    prof.scoring.calibration = str(Path(__file__).resolve().parents[2] / "README.md")
    prof.scoring.samples, prof.scoring.seq_len = 4, 64
    if hasattr(prof.build, "quality_samples"):
        prof.build.quality_samples = 0   # held-out windows would be cut from the same text
    prof.quantization.cpu_accuracy_level, prof.quantization.cpu_lm_head = 0, "fp16"
    prof.quantization.clip = "mse-act"
    prof.quantization.scheme, prof.quantization.symmetric = "channel", True
    prof.scoring.metric = "jaccard"
    out = build_bundle(tiny_llama_dir, tmp_path / "b", profile=prof.validate(),
                       progress=Progress(quiet=True))
    m = read_manifest(out)
    q = m["quantization"]
    assert q["clip"] == "mse-act" and q["int4"] == "int4-channel-sym-mse-act"
    assert q["int8"] == "int8-channel-sym"
    assert q["clip_calibration"]["samples"] == 4 and q["clip_calibration"]["seq_len"] == 64
    v = next(x for x in m["variants"] if x["name"] == "int4")
    ids = np.random.default_rng(3).integers(0, 512, 40)
    got = ev.onnx_logits_fn(out, m, "int4")(ids)
    ref = ev.torch_logits_fn(tiny_llama_dir, v["precisions"], q)(ids)
    assert max_diff(got, ref) <= 1e-3
    rtn = ev.torch_logits_fn(tiny_llama_dir, v["precisions"])(ids)
    assert max_diff(rtn, ref) > 1e-2
    with pytest.raises(LsaqError, match="fingerprint differs"):
        ev.torch_logits_fn(tiny_llama_dir, v["precisions"], {
            "scheme": "channel", "clip": "mse-act",
            "clip_calibration": {**q["clip_calibration"], "windows_sha256": "0" * 64}})
