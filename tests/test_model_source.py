import json

import numpy as np
import pytest

from lsaq_compile.errors import LsaqError
from lsaq_compile.model_source import open_model
from conftest import make_tiny_model


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
