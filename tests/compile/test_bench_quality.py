"""benchmarks/bench_quality.py's byte accounting and comparison helpers (no llama.cpp needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
gguf = pytest.importorskip("gguf")
bq = pytest.importorskip("bench_quality")


def _tiny_gguf(path: Path) -> Path:
    """One decoder layer: q in Q8_0, the other six linears in F16, an F32 norm, a Q8_0 tied
    token embedding."""
    from gguf.quants import quantize

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name in bq.DECODER_LINEARS:
        x = rng.standard_normal((8, 64)).astype(np.float32)
        if name == "attn_q":
            w.add_tensor(f"blk.0.{name}.weight", quantize(x, q8), raw_dtype=q8)
        else:
            w.add_tensor(f"blk.0.{name}.weight", x.astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    emb = rng.standard_normal((16, 64)).astype(np.float32)
    w.add_tensor("token_embd.weight", quantize(emb, q8), raw_dtype=q8)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_bytes(tmp_path):
    r = bq.gguf_bytes(_tiny_gguf(tmp_path / "tiny.gguf"))
    n = 8 * 64
    lin = 6 * n * 2 + n // 32 * 34          # six F16 tensors and one Q8_0 (34 bytes / 32 weights)
    assert r["decoder_linear_params"] == 7 * n
    assert r["decoder_linear_bytes"] == lin
    assert r["bits_per_decoder_linear_weight"] == pytest.approx(8 * lin / (7 * n))
    assert r["tensor_bytes"] == lin + 64 * 4 + 16 * 64 // 32 * 34
    assert r["file_bytes"] > r["tensor_bytes"]
    assert r["token_embd"] == "Q8_0" and r["output"].startswith("tied")
    assert r["linear_types"]["attn_q"] == {"Q8_0": 1} and r["linear_types"]["ffn_down"] == {"F16": 1}
    assert bq.type_summary(r["linear_types"]) == "F16 x6, Q8_0 x1"


def test_nearest_and_params():
    llama = {"Q8_0": {"bits_per_decoder_linear_weight": 8.5},
             "Q4_0": {"bits_per_decoder_linear_weight": 4.5},
             "F16": {"bits_per_decoder_linear_weight": 16.0}}
    assert bq.nearest_at_or_above(4.5, llama) == "Q4_0"
    assert bq.nearest_at_or_above(4.6, llama) == "Q8_0"
    assert bq.nearest_at_or_above(16.0, llama) == "F16"
    assert bq.nearest_at_or_above(17.0, llama) is None
    # SmolLM2-135M: 30 layers of q, k, v, o (576x576, 2 x 576x192, 576x576) and 3 x 576x1536
    model = {"hidden_size": 576, "head_dim": 64, "num_attention_heads": 9,
             "num_key_value_heads": 3, "intermediate_size": 1536, "num_layers": 30}
    assert bq.decoder_linear_params(model) == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)


def test_paired_difference():
    assert bq.paired([3.0, 3.2], [3.0, 3.2]) == (0.0, 0.0)
    pct, se = bq.paired([3.1, 3.3, 3.0], [3.0, 3.2, 3.0])
    d = np.array([0.1, 0.1, 0.0])
    assert pct == pytest.approx(100 * np.expm1(d.mean()))
    assert se == pytest.approx(100 * np.exp(d.mean()) * d.std(ddof=1) / np.sqrt(3))
    assert bq.paired(None, [3.0]) is None and bq.paired([3.0], [3.0, 3.1]) is None


def test_flattered_marks_follow_the_source_file():
    """The † marks come from the source's own tensor types, not from SmolLM2's: SmolLM2 ships
    Q4_1, which flatters 32-wide asymmetric 4-bit schemes; a Q8_0 source flatters Q8_0 only."""
    g32_asym = {"scheme": "group", "group_size": 32, "symmetric": False}
    channel = {"scheme": "channel", "group_size": None, "symmetric": True}
    try:
        types = bq.source_linear_types(None)          # the default model's GGUF
        assert types == {"Q4_1": 30 * 7}
        bq.SOURCE_TYPES.update(types)
        assert bq.flattered_lsaq(g32_asym) and not bq.flattered_lsaq(channel)
        assert bq.flattered_gguf({"linear_types": {"attn_q": {"Q4_K": 1}}})
        assert not bq.flattered_gguf({"linear_types": {"attn_q": {"Q8_0": 1}}})
        assert "Q4_1" in bq.source_caveat()
        bq.SOURCE_TYPES.clear()
        bq.SOURCE_TYPES.add("Q8_0")
        assert not bq.flattered_lsaq(g32_asym)
        assert bq.flattered_gguf({"linear_types": {"attn_q": {"Q8_0": 1}}})
        bq.SOURCE_TYPES.clear()
        assert bq.source_caveat() == "" and not bq.flattered_lsaq(g32_asym)
    finally:
        bq.SOURCE_TYPES.clear()


@pytest.mark.parametrize("family", ["gemma3", "phi3", "qwen2"])
def test_peer_hf_folder_keeps_every_tensor_of_the_family(family, tmp_path):
    """The float folder the peer benchmarks give llama.cpp and transformers holds the same
    tensors as the checkpoint (Gemma's four norms a layer, q/k norms, Qwen2's biases, Phi-3's
    fused projections), not only Llama's."""
    from safetensors.numpy import load_file

    from factories.models import make_tiny_family
    from lsaq_compile.model_source import open_model

    peers = pytest.importorskip("bench_peers")
    d = make_tiny_family(tmp_path / "hf", family)
    want = load_file(d / "model.safetensors")
    got = peers.hf_tensors(open_model(d))
    tied = "lm_head.weight" not in want
    assert set(got) - ({"lm_head.weight"} if tied else set()) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v.astype(np.float32))
