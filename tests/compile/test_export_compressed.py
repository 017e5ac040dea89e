"""`lsaq-compile export --to compressed-tensors`: compressed-tensors' own decompressor reads
every exported weight back equal to the bundle's dequantized weight, the packing is byte for
byte what compressed-tensors writes for the same codes, the config parses as its
QuantizationConfig, and transformers (CPU) computes the compiler's torch reference of the same
plan from the folder, for every family; bad inputs get one line and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from factories.bundles import Expected, build, family_bundle
from factories.cli import run_cli


ct = pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")


def run(capsys, args) -> tuple[int, str, str]:
    return run_cli(capsys, "compile", args)


def export(bundle, variant, out, capsys, *extra) -> str:
    code, o, e = run(capsys, ["export", bundle, "--variant", variant, "--to",
                              "compressed-tensors", "-o", out, *extra])
    assert code == 0, e
    return o


@pytest.fixture(scope="module")
def asym_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    return build(tiny_llama_dir, tmp_path_factory.mktemp("ct") / "asym", group_asym=True)


HF = {"self_attn.q_proj": ("self_attn.qkv_proj", "q"), "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
      "self_attn.v_proj": ("self_attn.qkv_proj", "v"), "self_attn.o_proj": ("self_attn.o_proj", None),
      "mlp.gate_proj": ("mlp.gate_up_proj", "gate"), "mlp.up_proj": ("mlp.gate_up_proj", "up"),
      "mlp.down_proj": ("mlp.down_proj", None),
      "self_attn.qkv_proj": ("self_attn.qkv_proj", None), "mlp.gate_up_proj": ("mlp.gate_up_proj", None)}


def expected_module(exp: Expected, variant: str, module: str) -> tuple[np.ndarray, str]:
    layer, name = int(module.split(".")[2]), module.split(".", 3)[3]
    lin, part = HF[name]
    w, p = exp.linear(variant, layer, lin)
    ff = exp.m["model"]["intermediate_size"]
    q, kv = exp.q_dim, exp.kv_dim
    rows = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv), "gate": (0, ff),
            "up": (ff, 2 * ff), None: (0, w.shape[0])}[part]
    return w[rows[0]:rows[1]], p


def check_decompressed(folder: Path, exp: Expected, variant: str,
                       embedding_dtype: str = "float32") -> dict:
    """Every module through compressed-tensors' PackedQuantizationCompressor.decompress."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    modules = {k.rsplit(".", 1)[0] for k in sd if k.startswith("model.layers.")
               and k.endswith((".weight_packed", ".weight")) and "norm" not in k}
    qc = cfg.get("quantization_config")
    scheme_of = {}
    if qc:
        conf = QuantizationConfig.model_validate(qc)
        for g in conf.config_groups.values():
            for t in g.targets:
                scheme_of[t] = g
        assert set(qc["ignore"]) >= {m for m in modules if f"{m}.weight" in sd}
    counts = {}
    for m in sorted(modules):
        want, p = expected_module(exp, variant, m)
        if f"{m}.weight" in sd:
            assert p == "fp16" and m not in scheme_of
            got = sd[f"{m}.weight"].float().numpy()
        else:
            scheme = scheme_of[m]
            assert scheme.weights.num_bits == int(p[3:])
            state = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == m}
            state["weight_scale"] = state["weight_scale"].float()   # decompress in float32
            got = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
        np.testing.assert_array_equal(got, want, err_msg=m)
        counts[p] = counts.get(p, 0) + 1
    # the token tables: an fp16 embedding as it is, a quantized one as float32 of its
    # dequantized values, exactly (vLLM reads no quantized embedding), or float16 of them when
    # asked; the LM head of the GPU graph (never the CPU's INT8 copy): fp16 as it is, quantized
    # as a quantized Linear target from the table's own codes (a tied one: the folder is untied)
    emb = exp.embedding(variant)
    got = sd["model.embed_tokens.weight"]
    if exp.tables(variant)["embed_tokens"] == "fp16":
        assert got.dtype == torch.float16
        np.testing.assert_array_equal(got.float().numpy(), emb)
    elif embedding_dtype == "float32":
        assert got.dtype == torch.float32
        np.testing.assert_array_equal(got.numpy(), emb)
    else:
        assert got.dtype == torch.float16
        np.testing.assert_array_equal(got.numpy(), emb.astype(np.float16))
    head, hp = exp.head(variant, cpu=False)
    if head is None and hp != "fp16":   # a tied quantized table: untied, head from its codes
        head = emb
    assert cfg["tie_word_embeddings"] == (head is None)
    if head is not None:
        if hp == "fp16":
            if qc:
                assert "lm_head" in qc["ignore"]
            np.testing.assert_array_equal(sd["lm_head.weight"].float().numpy(), head)
        else:
            scheme = scheme_of["lm_head"]
            assert scheme.weights.num_bits == int(hp[3:])
            state = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == "lm_head"}
            state["weight_scale"] = state["weight_scale"].float()
            got = PackedQuantizationCompressor.decompress(state, scheme)["weight"].numpy()
            np.testing.assert_array_equal(got, head, err_msg="lm_head")
        counts["lm_head:" + hp] = 1
    counts["embed_tokens:" + exp.tables(variant)["embed_tokens"]] = 1
    return counts


@pytest.mark.parametrize("which", ["channel", "asym"])
def test_every_variant_decompresses_to_the_bundles_weights(which, tiny_bundle, asym_bundle,
                                                           tmp_path, capsys):
    b = tiny_bundle if which == "channel" else asym_bundle
    exp = Expected(b)
    for v in exp.m["variants"]:
        out = tmp_path / v["name"]
        o = export(b, v["name"], out, capsys)
        counts = check_decompressed(out, exp, v["name"])
        c = v["layer_counts"]
        assert "embed_tokens:fp16" in counts and "lm_head:int8" not in counts
        assert ("int4" in counts) == bool(c["int4"] or c.get("mixed")), counts
        cfg = json.loads((out / "config.json").read_text())
        assert ("quantization_config" in cfg) == (v["name"] != "fp16")
        assert (out / "tokenizer.json").read_bytes() == (b / "tokenizer" / "tokenizer.json").read_bytes()
        assert json.loads((out / "lsaq_export.json").read_text())["variant"] == v["name"]
        assert "exactly" in o
    # the tokenizer loads as transformers' fast tokenizer (a class transformers 4 knows too)
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "the export keeps the tokenizer"
    want = Tokenizer.from_file(str(b / "tokenizer" / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids
    assert AutoTokenizer.from_pretrained(str(out)).encode(text, add_special_tokens=False) == want


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_quantized_tables_decompress_and_compute(which, ladder_bundles, tmp_path, capsys):
    """Every variant of a ladder whose tables are quantized: the embedding as float32 of the
    table's dequantized values (exact, said in one line with its bytes), the LM head a
    quantized Linear target read back exactly by compressed-tensors' decompressor;
    transformers computes the compiler's torch reference of the same plan and tables within
    1e-3 (absolute: the float32 embedding is the bundle's, so nothing but the order of float32
    operations differs). With --embedding-dtype float16 the embedding is float16 of those
    values, its rounding measured and printed."""
    from lsaq_compile.export_compressed import transformers_model

    b = ladder_bundles[which]
    exp = Expected(b)
    ids = np.asarray([3, 17, 42, 99, 5, 250, 7, 64, 128, 31, 200, 11, 9, 44, 71], np.int64)
    seen, loaded16 = set(), False
    int8_tables = next(v["name"] for v in exp.m["variants"] if v["tables"]["embed_tokens"] == "int8")
    for v in exp.m["variants"]:
        name = v["name"]
        out = tmp_path / name
        errs = tmp_path / f"{name}.json"
        o = export(b, name, out, capsys, "--errors-json", errs)
        counts = check_decompressed(out, exp, name)
        seen |= {k for k in counts if ":" in k}
        rec = {r["module"]: r for r in json.loads(errs.read_text())}
        quantized = v["tables"]["embed_tokens"] != "fp16"
        lines = [x for x in o.splitlines() if "model.embed_tokens" in x]
        if quantized:
            assert len(lines) == 1 and "float32" in lines[0] and "(exact;" in lines[0]
            r = rec["model.embed_tokens"]
            assert r["exact"] and r["rel_rms"] == 0 and r["format"] == "float32"
        else:
            assert lines == [] and "model.embed_tokens" not in rec
        if name in ("int4", int8_tables):
            model, how = transformers_model(out)
            with torch.no_grad():
                got = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
            want = _reference(b, name)(ids)
            assert np.abs(got - want).max() < 1e-3, name
            if quantized and how == "from_pretrained":
                # loaded at the config's dtype (float16), the float32 table is rounded on load
                from transformers import AutoModelForCausalLM

                m16 = AutoModelForCausalLM.from_pretrained(str(out))
                e16 = m16.get_input_embeddings().weight
                assert e16.dtype == torch.float16
                np.testing.assert_array_equal(e16.detach().numpy(),
                                              exp.embedding(name).astype(np.float16))
                loaded16 = True
    assert {"embed_tokens:int8", "embed_tokens:int4", "lm_head:int4"} <= seen, seen
    assert loaded16   # the INT8-table variant is symmetric: transformers loads it itself
    # half the embedding's bytes, rounded, on request
    out = tmp_path / "f16"
    errs = tmp_path / "f16.json"
    o = export(b, int8_tables, out, capsys, "--errors-json", errs, "--embedding-dtype", "float16")
    check_decompressed(out, exp, int8_tables, embedding_dtype="float16")
    r = {r["module"]: r for r in json.loads(errs.read_text())}["model.embed_tokens"]
    assert not r["exact"] and 0 < r["rel_rms"] < 1e-3 and r["format"] == "float16"
    line = next(x for x in o.splitlines() if "model.embed_tokens" in x)
    assert "not exact" in line and f"{r['rel_rms']:.2e}" in line


def test_packing_is_compressed_tensors_own(asym_bundle, tmp_path, capsys):
    """The packed words and zero points equal compressed-tensors' pack_to_int32 of the codes."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import load_file

    from lsaq_compile.bundle_reader import BundleReader

    out = tmp_path / "int4"
    export(asym_bundle, "int4", out, capsys)
    sd = load_file(str(out / "model.safetensors"))
    r = BundleReader.open(asym_bundle, verify=False)
    w = next(x for x in r.variant_weights(r.variant("int4")) if x.name.endswith("1.mlp.down_proj.weight"))
    q = r.quantized(w)
    signed = torch.from_numpy(q.codes[:, :q.k].astype(np.int16) - 8).to(torch.int8)
    assert torch.equal(pack_to_int32(signed, 4), sd["model.layers.1.mlp.down_proj.weight_packed"])
    zp = torch.from_numpy(q.zero_points.astype(np.int16) - 8).to(torch.int8)
    assert torch.equal(pack_to_int32(zp, 4, packed_dim=0),
                       sd["model.layers.1.mlp.down_proj.weight_zero_point"])
    assert sd["model.layers.1.mlp.down_proj.weight_shape"].tolist() == [q.n, q.k]


FAMILIES = {"llama": {}, "qwen2": {}, "qwen3": {}, "mistral": {}, "llama3": {},
            "phi3": {}, "gemma3": {}}


@pytest.fixture(scope="module")
def family_bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ct-families")
    return {f: family_bundle(tmp, f, **ov) for f, ov in FAMILIES.items()}


def _reference(bundle: Path, variant: str):
    from lsaq_compile.evaluate import torch_logits_fn

    m = json.loads((bundle / "manifest.json").read_text())
    v = next(x for x in m["variants"] if x["name"] == variant)
    q = m["quantization"]
    return torch_logits_fn(m["model"]["source"]["path"], v["precisions"], q,
                           tables=v.get("tables"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_computes_the_plans_reference(family, family_bundles, tmp_path, capsys):
    """transformers loads the folder (its integration, or for zero-point weights compressed-
    tensors' decompressor: see export_compressed.transformers_model) and computes the same
    logits as the compiler's torch reference of the plan, past the sliding window and, for
    Phi-3, past its longrope switch."""
    from lsaq_compile.export_compressed import transformers_model

    b = family_bundles[family]
    ids = np.asarray([3, 17, 42, 99, 5, 250, 7, 64, 128, 31, 200, 11, 9, 44, 71, 13, 2, 88,
                      150, 33], np.int64)
    for variant in ("int8", "int4x2"):
        out = tmp_path / f"{family}-{variant}"
        export(b, variant, out, capsys)
        model, how = transformers_model(out)
        assert how == ("from_pretrained" if variant == "int8" else "decompressor")
        with torch.no_grad():
            got = model(torch.from_numpy(ids)[None]).logits[0].float().numpy()
        want = _reference(b, variant)(ids)
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), family


def test_bad_inputs(asym_bundle, tmp_path, capsys):
    out = tmp_path / "x"
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "nope", "--to",
                              "compressed-tensors", "-o", out])
    assert code == 2 and "no variant 'nope'" in e and "Traceback" not in e and not out.exists()
    export(asym_bundle, "int8", out, capsys)
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int4", "--to",
                              "compressed-tensors", "-o", out])
    assert code == 2 and "already exists; pass --force" in e
    export(asym_bundle, "int4", out, capsys, "--force")
    assert json.loads((out / "lsaq_export.json").read_text())["variant"] == "int4"
    (out / "notes.txt").write_text("mine")        # now the folder holds a user's file
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int8", "--to",
                              "compressed-tensors", "-o", out, "--force"])
    assert code == 2 and "notes.txt" in e and (out / "notes.txt").read_text() == "mine"
    user = tmp_path / "model"
    user.mkdir()
    (user / "config.json").write_text("{}")
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int8", "--to",
                              "compressed-tensors", "-o", user, "--force"])
    assert code == 2 and "not a folder written by lsaq-compile export" in e
    assert (user / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
