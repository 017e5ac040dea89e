"""`lsaq-compile export --to gguf`: every tensor read back by gguf's own reader equals the
bundle's dequantized weight (exactly for Q8_0, Q4_0, F16, F32; Q4_1 within the error the export
reports, which is measured again here), the tokenizer and chat template in the metadata, the
Modelfile's template against the Jinja one, the families llama.cpp names, and bad inputs.
If llama-cpp-python is installed, llama.cpp itself loads a tiny export and its logits are
compared with the bundle's graph (CI does not build llama.cpp: those tests skip there)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from factories.bundles import Expected, build, family_bundle
from factories.cli import run_cli


gguf = pytest.importorskip("gguf")
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def run(capsys, args) -> tuple[int, str, str]:
    return run_cli(capsys, "compile", args)


def export(bundle, variant, out, capsys, *extra) -> list[dict]:
    errs = Path(str(out) + ".errors.json")
    code, o, e = run(capsys, ["export", bundle, "--variant", variant, "--to", "gguf", "-o", out,
                              "--errors-json", errs, *extra])
    assert code == 0, e
    return json.loads(errs.read_text())


@pytest.fixture(scope="module")
def asym_bundle(tiny_llama_dir, tmp_path_factory) -> Path:
    """The default profile's INT4 (group 32, zero points, clipping search) on a tiny Llama."""
    return build(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "asym", group_asym=True)


def _perm(n_head: int, rows: int) -> np.ndarray:
    """llama.cpp's converter permutes Llama q/k rows: row j of its tensor is row perm[j] of HF's."""
    hd = rows // n_head
    return np.arange(rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(-1)


def expected_tensors(exp: Expected, variant: str, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> the float32 weight llama.cpp must compute with, from the bundle."""
    mo = exp.m["model"]
    heads, kvh, h = mo["num_attention_heads"], mo["num_key_value_heads"], mo["hidden_size"]
    q, kv, ff = exp.q_dim, exp.kv_dim, mo["intermediate_size"]
    permute = arch == "llama"
    out = {"token_embd.weight": exp.embedding(variant),
           "output_norm.weight": exp.store["model.norm.weight"]}
    head, _ = exp.head(variant)
    if head is not None:   # else llama.cpp's output is token_embd itself (tied, one precision)
        out["output.weight"] = head
    for i in range(mo["num_layers"]):
        b = f"blk.{i}"
        qkv, _ = exp.linear(variant, i, "self_attn.qkv_proj")
        gu, _ = exp.linear(variant, i, "mlp.gate_up_proj")
        if arch == "phi3":
            out[f"{b}.attn_qkv.weight"], out[f"{b}.ffn_up.weight"] = qkv, gu
        else:
            wq, wk = qkv[:q], qkv[q:q + kv]
            out[f"{b}.attn_q.weight"] = wq[_perm(heads, q)] if permute else wq
            out[f"{b}.attn_k.weight"] = wk[_perm(kvh, kv)] if permute else wk
            out[f"{b}.attn_v.weight"] = qkv[q + kv:]
            out[f"{b}.ffn_gate.weight"], out[f"{b}.ffn_up.weight"] = gu[:ff], gu[ff:]
        out[f"{b}.attn_output.weight"] = exp.linear(variant, i, "self_attn.o_proj")[0]
        out[f"{b}.ffn_down.weight"] = exp.linear(variant, i, "mlp.down_proj")[0]
        p = f"model.layers.{i}"
        out[f"{b}.attn_norm.weight"] = exp.store[f"{p}.input_layernorm.weight"]
        if arch == "gemma3":
            out[f"{b}.post_attention_norm.weight"] = exp.store[f"{p}.post_attention_layernorm.weight"]
            out[f"{b}.ffn_norm.weight"] = exp.store[f"{p}.pre_feedforward_layernorm.weight"]
            out[f"{b}.post_ffw_norm.weight"] = exp.store[f"{p}.post_feedforward_layernorm.weight"]
        else:
            out[f"{b}.ffn_norm.weight"] = exp.store[f"{p}.post_attention_layernorm.weight"]
        if f"{p}.self_attn.qk_norm.weight" in exp.store:
            t = exp.store[f"{p}.self_attn.qk_norm.weight"]
            out[f"{b}.attn_q_norm.weight"], out[f"{b}.attn_k_norm.weight"] = t[0], t[heads]
        if f"{p}.self_attn.qkv_proj.bias" in exp.store:
            bias = exp.store[f"{p}.self_attn.qkv_proj.bias"]
            out[f"{b}.attn_q.bias"], out[f"{b}.attn_k.bias"] = bias[:q], bias[q:q + kv]
            out[f"{b}.attn_v.bias"] = bias[q + kv:]
    return out


def check_readback(path: Path, exp: Expected, variant: str, records: list[dict]) -> dict:
    """Every tensor of the GGUF through gguf's reader and dequantizer against the bundle;
    returns the count by type."""
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    want = expected_tensors(exp, variant, arch)
    rope = {"rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight"}
    got_names = {t.name for t in r.tensors} - rope      # RoPE factors: test_families_read_back
    assert got_names == set(want), (got_names ^ set(want))
    reported = {x["name"]: x for x in records}
    types = {}
    for t in r.tensors:
        if t.name in rope:
            continue
        w = want[t.name]
        d = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(w.shape)
        ty = t.tensor_type.name
        types[ty] = types.get(ty, 0) + 1
        assert reported[t.name]["type"] == ty
        if ty == "Q4_1":
            # m = -scale x zero point in float16: not exact; the export measured the same error
            err = float(np.sqrt(((d.astype(np.float64) - w) ** 2).sum() / (w.astype(np.float64) ** 2).sum()))
            assert 0 < err < 3e-3, (t.name, err)
            assert reported[t.name]["rel_rms"] == pytest.approx(err, rel=1e-3, abs=1e-9)
            assert not reported[t.name]["exact"]
        else:
            np.testing.assert_array_equal(d, w, err_msg=t.name)
            assert reported[t.name]["exact"], t.name
    return types


def test_every_variant_reads_back_exact_channel(tiny_bundle, tmp_path, capsys):
    """The paper's per-channel symmetric INT8/INT4: Q8_0 and Q4_0, every tensor exact."""
    exp = Expected(tiny_bundle)
    for v in exp.m["variants"]:
        out = tmp_path / f"{v['name']}.gguf"
        rec = export(tiny_bundle, v["name"], out, capsys)
        types = check_readback(out, exp, v["name"], rec)
        assert "Q4_1" not in types
        c = v["layer_counts"]
        assert ("Q8_0" in types) == bool(c["int8"] or c.get("mixed")), types
        assert ("Q4_0" in types) == bool(c["int4"] or c.get("mixed")), types


def test_every_variant_reads_back_asymmetric_group(asym_bundle, tmp_path, capsys):
    exp = Expected(asym_bundle)
    for v in exp.m["variants"]:
        out = tmp_path / f"{v['name']}.gguf"
        rec = export(asym_bundle, v["name"], out, capsys)
        types = check_readback(out, exp, v["name"], rec)
        if v["name"] == "int4":
            assert set(types) == {"Q4_1", "F16", "F32"}
    # the Q4_1 error is said on the command's output, not only in the JSON
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int4", "--to", "gguf",
                              "-o", tmp_path / "again.gguf"])
    assert code == 0 and "not exact:" in o and "Q4_1" in o and "relative RMS error" in o


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_quantized_tables_read_back(which, ladder_bundles, tmp_path, capsys):
    """token_embd and output are written from the bundle's own table codes and scales: INT8 as
    Q8_0 and per-channel INT4 as Q4_0 (exact), group INT4 with zero points as Q4_1 (its error
    reported); a tied model's one quantized table is token_embd alone (llama.cpp's output
    falls back to it); the CPU graphs' INT8 head of an fp16 table is output, as Q8_0."""
    b = ladder_bundles[which]
    exp = Expected(b)
    int4 = "Q4_0" if which == "tied" else "Q4_1"
    gtype = {"fp16": "F16", "int8": "Q8_0", "int4": int4}
    seen = set()
    for v in exp.m["variants"]:
        name = v["name"]
        out = tmp_path / f"{name}.gguf"
        rec = export(b, name, out, capsys)
        check_readback(out, exp, name, rec)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
        emb = v["tables"]["embed_tokens"]
        assert types["token_embd.weight"] == gtype[emb], (name, types["token_embd.weight"])
        head, hp = exp.head(name)
        if head is None:
            assert which == "tied" and "output.weight" not in types
        else:
            assert types["output.weight"] == gtype[hp]
        seen.add((emb, hp, "output.weight" in types))
    embs = {e for e, _, _ in seen}
    assert {"fp16", "int8", "int4"} <= embs, seen
    if which == "tied":
        # the fp16-table rung of INT8 linears: its CPU head is the INT8 table, written as output
        assert ("fp16", "int8", True) in seen, seen
    code, o, e = run(capsys, ["export", b, "--variant", "int4", "--to", "gguf",
                              "-o", tmp_path / "again.gguf"])
    assert code == 0
    if which == "untied":   # the Q4_1 tables' error is said, with the others'
        assert "not exact:" in o and "Q4_1" in o
    else:
        assert "every tensor holds the bundle's numbers exactly" in o


def test_metadata_tokenizer_and_marker(asym_bundle, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    export(asym_bundle, "int8", out, capsys)
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    m = json.loads((asym_bundle / "manifest.json").read_text())
    mo, tok = m["model"], m["tokenizer"]
    assert f["general.architecture"] == "llama"
    assert f["llama.block_count"] == mo["num_layers"]
    assert f["llama.attention.head_count_kv"] == mo["num_key_value_heads"]
    assert f["llama.rope.dimension_count"] == mo["head_dim"]
    cfg = json.loads((Path(m["model"]["source"]["path"]) / "config.json").read_text())
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.get("rope_theta", 10000.0))
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    tj = json.loads((asym_bundle / "tokenizer" / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == mo["vocab_size"]
    assert all(tokens[i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.merges"][:3] == [" ".join(x) if isinstance(x, list) else x
                                              for x in tj["model"]["merges"][:3]]
    assert f["tokenizer.ggml.bos_token_id"] == tok["bos_token_id"]
    assert f["tokenizer.ggml.eos_token_id"] == tok["eos_token_ids"][0]
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    assert {i for i, ty in enumerate(f["tokenizer.ggml.token_type"]) if ty == 3} == special
    assert json.loads(f["lsaq.export"])["variant"] == "int8"


FAMILY_CASES = {
    # (make_tiny_family overrides, llama.cpp architecture)
    "qwen2": ({}, "qwen2"),                      # q/k/v biases
    "qwen3": ({}, "qwen3"),                      # tied embeddings, q/k norms, head_dim 32
    "mistral": ({}, "llama"),                    # sliding window llama.cpp does not apply
    "llama3": ({}, "llama"),                     # Llama 3.x RoPE: rope_freqs factors
    "phi3": (dict(rope_scaling=None), "phi3"),  # fused attn_qkv, gate|up in ffn_up
    "gemma3": (dict(query_pre_attn_scalar=16), "gemma3"),   # llama.cpp: 1/sqrt(head_dim)
}


@pytest.fixture(scope="module")
def family_bundles(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf-families")
    return {f: family_bundle(tmp, f, **ov) for f, (ov, _) in FAMILY_CASES.items()}


@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_families_read_back(family, family_bundles, tmp_path, capsys):
    b = family_bundles[family]
    exp = Expected(b)
    out = tmp_path / f"{family}.gguf"
    rec = export(b, "int4x2", out, capsys)
    check_readback(out, exp, "int4x2", rec)
    r = gguf.GGUFReader(str(out))
    arch = FAMILY_CASES[family][1]
    assert r.fields["general.architecture"].contents() == arch
    names = {t.name for t in r.tensors}
    if family == "llama3":
        # llama.cpp's frequencies base^(-2i/d) / rope_freqs[i] are the bundle's inv_freq
        t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
        f = np.asarray(t.data, np.float64)
        base = r.fields["llama.rope.freq_base"].contents()
        d = exp.m["model"]["head_dim"]
        theta = base ** (-np.arange(0, d, 2) / d) / f
        np.testing.assert_allclose(theta, exp.store["rope.inv_freq"], rtol=2e-6)
        assert f.max() / f.min() > 1.5
    else:
        assert "rope_freqs.weight" not in names
    if family == "gemma3":
        flds = r.fields
        assert flds["gemma3.attention.sliding_window"].contents() == 8
        assert flds["gemma3.final_logit_softcapping"].contents() == pytest.approx(8.0)
        assert flds["gemma3.rope.scaling.type"].contents() == "linear"
        assert flds["gemma3.rope.freq_base_swa"].contents() == pytest.approx(1e4)
        assert flds["gemma3.attention.sliding_window_pattern"].contents() == [
            True, True, False, True]
    if family == "mistral":
        code, o, e = run(capsys, ["export", b, "--variant", "int8", "--to", "gguf", "-o",
                                  tmp_path / "m2.gguf"])
        assert code == 0 and "sliding window of 8" in o


@pytest.mark.parametrize("family,overrides,why", [
    ("phi3", {}, "changes with the sequence length"),          # longrope past 16 positions
    ("gemma3", {}, "always uses"),                               # query_pre_attn_scalar 24
])
def test_architecture_llama_cpp_cannot_compute_is_refused(family, overrides, why, tmp_path,
                                                           capsys):
    b = family_bundle(tmp_path, family, **overrides)
    capsys.readouterr()   # the build's own output
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, ["export", b, "--variant", "int8", "--to", "gguf", "-o", out])
    assert code == 2 and why in e and "Traceback" not in e and len(e.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".Modelfile").exists()
    assert list(tmp_path.glob(".x.gguf*")) == []


# ------------------------------------------------------------------------------ bad inputs
def test_bad_inputs(asym_bundle, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int9", "--to", "gguf", "-o", out])
    assert code == 2 and "no variant 'int9'" in e and "int8" in e and "Traceback" not in e
    assert not out.exists()

    export(asym_bundle, "int8", out, capsys)
    first = out.read_bytes()
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int4", "--to", "gguf", "-o", out])
    assert code == 2 and "already exists; pass --force" in e
    assert out.read_bytes() == first
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int4", "--to", "gguf", "-o",
                              out, "--force"])
    assert code == 0 and out.read_bytes() != first

    # --force never replaces a file the exporter did not write, GGUF or not
    for name, content in (("user.gguf", b"my notes"), ("theirs.gguf", None)):
        p = tmp_path / name
        if content is None:
            w = gguf.GGUFWriter(str(p), "llama")
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.close()
            content = p.read_bytes()
        else:
            p.write_bytes(content)
        code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int8", "--to", "gguf",
                                  "-o", p, "--force"])
        assert code == 2 and "nothing was deleted" in e, e
        assert p.read_bytes() == content
    mf = tmp_path / "b.Modelfile"
    mf.write_text("FROM llama3\n")
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int8", "--to", "gguf", "-o",
                              tmp_path / "b.gguf", "--force"])
    assert code == 2 and "Modelfile" in e and not (tmp_path / "b.gguf").exists()
    assert mf.read_text() == "FROM llama3\n"

    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int8", "--to", "gguf", "-o",
                              tmp_path / "nope" / "c.gguf"])
    assert code == 2 and "no such folder" in e
    code, o, e = run(capsys, ["export", asym_bundle, "--variant", "int8", "--to", "gguf", "-o",
                              tmp_path / "c.bin"])
    assert code == 2 and "must end in .gguf" in e
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bundle_failing_verification_is_refused(tiny_bundle, tmp_path, capsys):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    w = b / "weights" / "int8.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    out = tmp_path / "x.gguf"
    code, o, e = run(capsys, ["export", b, "--variant", "int8", "--to", "gguf", "-o", out])
    assert code == 2 and "fails verification" in e and "sha256" in e
    assert len(e.strip().splitlines()) == 1 and not out.exists()


# ------------------------------------------------------------------------------ Modelfile
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role']"
          " + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
         "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content']"
         " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n'"
         " }}{% endif %}")
ODD = ("{% for message in messages %}{% if loop.index0 % 2 == 0 %}[{{ message['content'] }}]"
       "{% else %}<{{ message['content'] }}>{% endif %}{% endfor %}")


@pytest.mark.parametrize("template,bos,default_system", [
    (CHATML, "<|im_start|>", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    (LLAMA3, "<|begin_of_text|>", None), (GEMMA, "<bos>", None)])
def test_chat_template_split_renders_like_jinja(template, bos, default_system):
    from lsaq_compile.export_modelfile import _probe_conversations, _render, chat_form, render_form

    f = chat_form(template, bos, "")
    assert f.default_system == default_system
    assert f.bos == ("" if template is CHATML else bos)   # SmolLM2's BOS text is a role marker
    convs = _probe_conversations() + [([{"role": "user", "content": "x"},
                                        {"role": "assistant", "content": "y"},
                                        {"role": "user", "content": "z"}], True)]
    for msgs, gen in convs:
        assert render_form(f, msgs, gen) == _render(template, msgs, gen, bos, "")


def test_chat_template_without_the_form_is_refused():
    from lsaq_compile.export_modelfile import _NoForm, chat_form

    with pytest.raises(_NoForm):
        chat_form(ODD, "", "")


def test_modelfile_from_a_chat_template(asym_bundle, tmp_path, capsys):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(asym_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["tokenizer"]["chat_template"] = CHATML.replace("<|im_start|>", "<s>").replace(
        "<|im_end|>", "</s>")
    (b / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "chat.gguf"
    export(b, "int8", out, capsys)
    text = out.with_suffix(".Modelfile").read_text()
    assert text.startswith("# Ollama Modelfile written by lsaq-compile export\n")
    assert "FROM ./chat.gguf" in text and 'PARAMETER stop "</s>"' in text
    assert 'TEMPLATE """' in text and '{{ "<s>user\\n" }}{{ .Content }}' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    r = gguf.GGUFReader(str(out))
    assert r.fields["tokenizer.chat_template"].contents() == m["tokenizer"]["chat_template"]


# ------------------------------------------------------------------------------ llama.cpp
def _llama(path: Path, n_ctx: int = 64):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)


def llama_cpp_matches(bundle: Path, variant: str, tmp_path, capsys):
    """Export `variant` to GGUF, run llama.cpp on a fixed prompt and assert its logits are the
    bundle's ONNX graph's; the loaded model, for more checks."""
    from lsaq_compile.evaluate import onnx_logits_fn
    from lsaq_runtime.manifest import load_manifest

    out = tmp_path / f"{variant}.gguf"
    export(bundle, variant, out, capsys)
    ids = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31, 200, 11]
    llm = _llama(out)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], np.float32)
    m = load_manifest(bundle)
    want = onnx_logits_fn(bundle, m, variant, context=64)(np.asarray(ids))
    # llama.cpp rounds activations to 8 bits (Q8_0/Q4_x) or float16 (F16) inside its matmuls
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.03 * scale, np.abs(got - want).max() / scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    return llm


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python not installed (bench extra)")
@pytest.mark.parametrize("variant", ["fp16", "int8", "int4x2", "int4"])
def test_llama_cpp_computes_the_bundles_logits(asym_bundle, variant, tmp_path, capsys):
    llm = llama_cpp_matches(asym_bundle, variant, tmp_path, capsys)
    text = llm.create_completion("the", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert isinstance(text, str)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python not installed (bench extra)")
@pytest.mark.parametrize("which", ["untied", "tied"])
def test_llama_cpp_computes_quantized_tables(ladder_bundles, which, tmp_path, capsys):
    """llama.cpp reads the INT4 token tables (and a tied model's one table as its output) and
    computes the bundle's logits."""
    from lsaq_runtime.manifest import load_manifest

    b = ladder_bundles[which]
    v = next(x for x in load_manifest(b)["variants"]
             if x["tables"]["embed_tokens"] == "int4")["name"]
    llama_cpp_matches(b, v, tmp_path, capsys)


def test_rows_gguf_cannot_block_are_written_f16_and_reported():
    """A row length that is not a multiple of 32 has no Q8_0/Q4_x form: the nearest type (F16
    of the dequantized values) is chosen and its error measured, never silently."""
    from lsaq_compile.bundle_reader import Quantized, Scheme, StoredWeight
    from lsaq_compile.export_gguf import encode, gguf_type
    from lsaq_compile.quantize import quantize_channel, quantize_group

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 48)).astype(np.float32)
    for qt, sym in ((quantize_channel(w, 8, block=16), True), (quantize_group(w, 4, 32, False), False)):
        codes = qt.codes()
        q = Quantized(Scheme(qt.bits, qt.block_size, sym, "channel" if sym else "group"), 8, 48,
                      codes, qt.scales, np.asarray(qt.zero_point_values(), np.uint8))
        t, exact = gguf_type(StoredWeight("x", "x", f"int{qt.bits}", (8, 48)), q.scheme,
                             q.scales, q.zero_points)
        assert t.name == "F16" and not exact
        rows, err2, ref2 = encode(q, t)
        np.testing.assert_allclose(rows.astype(np.float32), qt.dequantize(), rtol=1e-3, atol=1e-3)
        assert 0 < np.sqrt(err2.sum() / ref2.sum()) < 1e-3
    # a 16-block whose two halves share the row's scale is still one Q8_0 block
    q16 = quantize_channel(rng.standard_normal((4, 64)).astype(np.float32), 8, block=16)
    q = Quantized(Scheme(8, 16, True, "channel"), 4, 64, q16.codes(), q16.scales,
                  np.full(q16.scales.shape, 128, np.uint8))
    t, exact = gguf_type(StoredWeight("y", "y", "int8", (4, 64)), q.scheme, q.scales,
                         q.zero_points)
    assert t.name == "Q8_0" and exact
    rows, _, _ = encode(q, t)
    np.testing.assert_array_equal(gguf.dequantize(rows, t).reshape(4, 64), q16.dequantize())


@pytest.mark.slow
def test_real_smollm2_mix(smollm_bundle, tmp_path, capsys):
    """The real model's default-profile bundle: a mixed variant read back tensor by tensor,
    its tokenizer (SmolLM2's pre-tokenizer), its token tables (quantized on the ladder), and a
    Modelfile whose TEMPLATE states its ChatML template (with its default system message)."""
    exp = Expected(smollm_bundle)
    mixes = [v for v in exp.m["variants"] if v["layer_counts"].get("mixed") or
             (v["layer_counts"]["int8"] and v["layer_counts"]["int4"])]
    v = mixes[len(mixes) // 2]["name"]
    out = tmp_path / "smollm2.gguf"
    rec = export(smollm_bundle, v, out, capsys)
    r = gguf.GGUFReader(str(out))
    t = {x.name: x for x in r.tensors}
    # the token tables as the variant's CPU graph computes with them: quantized tables from
    # their own codes (schema 6), an fp16 table's INT8 CPU head as Q8_0; exact or reported
    reported = {x["name"]: x for x in rec}
    head, _ = exp.head(v)
    tables = {"token_embd.weight": exp.embedding(v)}
    if head is not None:
        tables["output.weight"] = head
    else:
        assert "output.weight" not in t
    n, k = exp.m["model"]["vocab_size"], exp.m["model"]["hidden_size"]
    for name, want in tables.items():
        got = gguf.dequantize(t[name].data, t[name].tensor_type).reshape(n, k)
        if t[name].tensor_type.name == "Q4_1":
            err = np.sqrt(((got - want) ** 2).sum() / (want ** 2).sum())
            assert reported[name]["rel_rms"] == pytest.approx(float(err), rel=1e-3)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    blk = [n for n in t if n.startswith("blk.")]
    assert len(blk) == 9 * exp.m["model"]["num_layers"]
    want = expected_tensors(exp, v, "llama")
    for name in blk:
        d = gguf.dequantize(t[name].data, t[name].tensor_type).reshape(want[name].shape)
        if t[name].tensor_type.name == "Q4_1":
            err = np.sqrt(((d - want[name]) ** 2).sum() / (want[name] ** 2).sum())
            assert reported[name]["rel_rms"] == pytest.approx(float(err), rel=1e-3)
        else:
            np.testing.assert_array_equal(d, want[name], err_msg=name)
    f = r.fields
    tj = json.loads((smollm_bundle / "tokenizer" / "tokenizer.json").read_text())
    from lsaq_compile.export_gguf import _PRE_NAMES, _pre_signature

    assert f["tokenizer.ggml.pre"].contents() == _PRE_NAMES[_pre_signature(tj["pre_tokenizer"])]
    mf = out.with_suffix(".Modelfile").read_text()
    assert 'TEMPLATE """' in mf and "<|im_start|>" in mf and 'PARAMETER stop "<|im_end|>"' in mf
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in mf
