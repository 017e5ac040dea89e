import json

import numpy as np
import pytest

from lsaq_compile.errors import LsaqError
from lsaq_compile.model_source import EMBED, open_model
from factories.models import make_tiny_family, make_tiny_model


def test_hf_folder_loads_per_tensor(tmp_path):
    d = make_tiny_model(tmp_path / "m", arch="qwen2")
    src = open_model(d)
    assert src.spec.architecture == "Qwen2ForCausalLM" and src.spec.attention_bias
    t = src.layer_tensors(1)
    assert t["self_attn.q_proj.weight"].shape == (64, 64) and "self_attn.q_proj.bias" in t
    assert t["mlp.down_proj.weight"].dtype == np.float32


def test_unsupported_architecture_one_line(tmp_path):
    d = make_tiny_model(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LsaqError, match="unsupported architecture 'GPTNeoXForCausalLM'.*LlamaForCausalLM"):
        open_model(d)


def test_phi3_fused_weights_are_split_exactly(tmp_path):
    """Phi-3 stores q|k|v and gate|up fused: the source serves the seven Llama linears, rows
    sliced in transformers' order (q, k, v; gate, up), and the fused names stay unknown."""
    from safetensors.numpy import load_file

    d = make_tiny_family(tmp_path / "m", "phi3")
    raw = load_file(d / "model.safetensors")
    src = open_model(d)
    s = src.spec
    assert s.architecture == "Phi3ForCausalLM" and s.family.fused_linears
    qkv, gate_up = raw["model.layers.1.self_attn.qkv_proj.weight"], raw["model.layers.1.mlp.gate_up_proj.weight"]
    q, kv, i = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.intermediate_size
    t = src.layer_tensors(1)
    assert "self_attn.qkv_proj.weight" not in t and "mlp.gate_up_proj.weight" not in t
    np.testing.assert_array_equal(t["self_attn.q_proj.weight"], qkv[:q])
    np.testing.assert_array_equal(t["self_attn.k_proj.weight"], qkv[q:q + kv])
    np.testing.assert_array_equal(t["self_attn.v_proj.weight"], qkv[q + kv:])
    np.testing.assert_array_equal(t["mlp.gate_proj.weight"], gate_up[:i])
    np.testing.assert_array_equal(t["mlp.up_proj.weight"], gate_up[i:])
    np.testing.assert_array_equal(src.tensor("model.layers.1.self_attn.v_proj.weight"), qkv[q + kv:])
    assert src.has_tensor("model.layers.1.mlp.up_proj.weight")
    # longrope normalised from the config (transformers' own rules): original length, factors
    assert s.rope_scaling["rope_type"] == "longrope"
    assert s.rope_scaling["original_max_position_embeddings"] == 16
    assert s.sliding_window == 12 and s.layer_types is None and s.layer_window(3) == 12


@pytest.mark.parametrize("family,want", [
    ("qwen3", dict(layer_types=["full_attention"] * 4, sliding_window=None, head_dim=32)),
    ("gemma3", dict(sliding_window=8, local_rope_theta=1e4, rope_theta=1e6, head_dim=16,
                    query_pre_attn_scalar=24, final_logit_softcapping=8.0,
                    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True)),
])
def test_family_facts_come_from_the_config(tmp_path, family, want):
    spec = open_model(make_tiny_family(tmp_path / "m", family)).spec
    for k, v in want.items():
        assert getattr(spec, k) == v, k
    if family == "gemma3":
        assert [spec.layer_window(i) for i in range(4)] == [8, 8, None, 8]
        assert [spec.uses_local_rope(i) for i in range(4)] == [True, True, False, True]
        assert spec.embed_scale == pytest.approx(8.0) and spec.attention_scale == 24 ** -0.5
        assert spec.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_multimodal_gemma3_is_refused_with_a_hint(tmp_path):
    d = make_tiny_model(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["Gemma3ForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LsaqError, match="Gemma3ForConditionalGeneration.*text-only "
                                        "Gemma3ForCausalLM"):
        open_model(d)


def test_bad_inputs(tmp_path):
    with pytest.raises(LsaqError, match="no such file"):
        open_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LsaqError, match="no config.json"):
        open_model(tmp_path / "empty")
    pk = tmp_path / "model.bin"
    pk.write_bytes(b"\x80\x04junk")
    with pytest.raises(LsaqError, match="pickle"):
        open_model(pk)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(LsaqError, match="not a readable GGUF"):
        open_model(bad)
    d = make_tiny_model(tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(LsaqError, match="not a readable safetensors"):
        open_model(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(LsaqError, match="pickle checkpoints are never loaded"):
        open_model(d)


def test_gguf_token_tables_are_read_by_row_ranges():
    """A GGUF's token table is read by row ranges from the memory map, only those rows
    dequantized (whole blocks a row), equal to the whole table's rows; and held whole nowhere.
    The tensors _read rearranges (q/k rows, norms) are not read by rows."""
    src = open_model(None)
    whole = src.tensor(EMBED)
    assert src.tensor_shape(EMBED) == whole.shape and src.table_rows_count(EMBED) == len(whole)
    for a, b in ((0, 1), (100, 357), (len(whole) - 5, len(whole))):
        np.testing.assert_array_equal(src.tensor_rows(EMBED, a, b), whole[a:b])
        np.testing.assert_array_equal(src.table_rows(EMBED, a, b),
                                      whole[a:b].astype(np.float16).astype(np.float32))
    assert src._tables16() == {}
    assert src.tensor_rows("model.layers.0.self_attn.q_proj.weight", 0, 4) is None
    assert src.tensor_rows("model.norm.weight", 0, 4) is None


def test_default_gguf_matches_transformers():
    """The direct GGUF reader (q/k rows un-permuted) equals transformers' own GGUF loading."""
    import torch
    from transformers import AutoModelForCausalLM

    src = open_model(None)
    assert src.spec.num_layers == 30 and src.spec.tie_word_embeddings
    hf = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                              dtype=torch.float32)
    sd = hf.state_dict()
    for name in ("model.layers.7.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                 "model.layers.7.self_attn.v_proj.weight", "model.layers.29.mlp.down_proj.weight",
                 "model.embed_tokens.weight", "model.norm.weight"):
        assert np.array_equal(src.tensor(name), sd[name].numpy()), name
