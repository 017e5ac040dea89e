"""Manifest checks on synthetic bundles: schema, version, cross-field rules, sizes, checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.integrity import verify_files
from lsaq_runtime.format import SCHEMA_VERSION, join_precision, split_precision
from lsaq_runtime.manifest import load_manifest, validate_manifest
from lsaq_runtime.verify import verify_bundle
from factories.synthetic import synthetic_manifest, write_bundle


def test_valid(tmp_path):
    b = write_bundle(tmp_path / "b")
    m = load_manifest(b)
    assert m["schema_version"] == SCHEMA_VERSION
    assert verify_bundle(b, check_graphs=False) == []
    # the synthetic "graphs" are text, which a full verify notices
    assert all("not a valid ONNX graph" in p for p in verify_bundle(b))
    verify_files(b, m, ["fp16.cpu.onnx"])


def _invalid(mutate, *patterns):
    m = synthetic_manifest(layers=3)
    mutate(m)
    with pytest.raises(LsaqRuntimeError) as e:
        validate_manifest(m)
    for p in patterns:
        assert p in str(e.value), str(e.value)


def test_schema_violations():
    _invalid(lambda m: m.pop("deployment"), "'deployment' is a required property")
    _invalid(lambda m: m["model"].update(num_layers="3"), "model/num_layers", "not of type 'integer'")
    _invalid(lambda m: m["variants"][0]["precisions"].__setitem__(0, "fp8"), "variants/0/precisions/0")
    _invalid(lambda m: m["files"][0].update(path="../outside.onnx"), "files/0/path")
    _invalid(lambda m: m["files"][0].update(path="/etc/passwd"), "files/0/path")
    _invalid(lambda m: m["files"][0].update(bytes=-1), "files/0/bytes")
    _invalid(lambda m: m["files"][0].update(sha256="xyz"), "files/0/sha256")
    _invalid(lambda m: m["variants"][0]["providers"]["cpu"].pop("resident_bytes"),
             "variants/0/providers/cpu", "resident_bytes")
    _invalid(lambda m: m["variants"][0]["providers"].update(tpu={}), "variants/0/providers")
    _invalid(lambda m: m["deployment"]["safety_margin"].update(fraction=2), "safety_margin/fraction")
    _invalid(lambda m: m.update(format="something"), "not an LSAQ bundle")


def test_cross_field_rules():
    _invalid(lambda m: m["variants"][0]["precisions"].pop(), "lists 2 layer precisions", "3 layers")
    _invalid(lambda m: m["variants"][1]["layer_counts"].update(int8=2), "layer_counts")
    _invalid(lambda m: m["variants"][1].update(name="fp16"), "'fp16' appears twice")
    _invalid(lambda m: m["files"].pop(0), "uses fp16.cpu.onnx, which is not in files")
    _invalid(lambda m: m["variants"][0]["providers"]["cpu"]["files"].remove("fp16.cpu.onnx"),
             "its graph fp16.cpu.onnx is not among its files")
    _invalid(lambda m: m["variants"][2]["providers"]["cpu"].update(kv_bytes_per_token=7680),
             "kv_bytes_per_token 7680 disagrees with the model's shape")
    _invalid(lambda m: m["model"].update(num_key_value_heads=3), "not a multiple of num_key_value_heads")
    _invalid(lambda m: m["tokenizer"].update(eos_token_ids=[512]), "token id 512 is outside")
    _invalid(lambda m: m["files"].pop(), "tokenizer/tokenizer.json is not in files")


def test_unknown_extra_keys_are_allowed():
    m = synthetic_manifest(layers=3)
    m["deployment"]["profile"] = "default"
    m["quantization"] = {"scheme": "channel", "int8": "int8-channel"}
    m["something_new"] = {"x": 1}
    validate_manifest(m)


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 99])
def test_newer_schema_version(tmp_path, version):
    m = synthetic_manifest(layers=3)
    m["schema_version"] = version
    m["new_required_thing"] = True
    b = write_bundle(tmp_path / "b", m)
    with pytest.raises(LsaqRuntimeError, match="newer lsaq-compile.*upgrade lsaq"):
        load_manifest(b)


def test_older_schema_version_asks_for_a_rebuild():
    m = synthetic_manifest(layers=3)
    m["schema_version"] = 1
    with pytest.raises(LsaqRuntimeError, match="older lsaq-compile.*rebuild"):
        validate_manifest(m)


@pytest.mark.parametrize("version", [0, "1", None, 1.5])
def test_bad_schema_version(version):
    m = synthetic_manifest(layers=3)
    m["schema_version"] = version
    with pytest.raises(LsaqRuntimeError, match="schema_version"):
        validate_manifest(m)


def test_not_a_bundle(tmp_path):
    with pytest.raises(LsaqRuntimeError, match="no such bundle folder"):
        load_manifest(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LsaqRuntimeError, match="manifest.json: missing"):
        load_manifest(tmp_path / "empty")
    b = write_bundle(tmp_path / "b")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(LsaqRuntimeError, match="not valid JSON"):
        load_manifest(b)


def test_size_mismatch_names_the_file(tmp_path):
    b = write_bundle(tmp_path / "b")
    w = b / "weights" / "float.safetensors"
    w.write_bytes(w.read_bytes()[:-5])
    with pytest.raises(LsaqRuntimeError, match=r"weights/float.safetensors: truncated"):
        load_manifest(b)
    w.write_bytes(w.read_bytes() + b"0123456789")
    with pytest.raises(LsaqRuntimeError, match=r"weights/float.safetensors: longer than listed"):
        load_manifest(b)
    assert len(verify_bundle(b)) == 1


def test_missing_file_and_tokenizer(tmp_path):
    b = write_bundle(tmp_path / "b")
    (b / "int8.cuda.onnx").unlink()
    with pytest.raises(LsaqRuntimeError, match=r"int8.cuda.onnx: missing"):
        load_manifest(b)
    b = write_bundle(tmp_path / "c")
    (b / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(LsaqRuntimeError, match=r"tokenizer.json: the tokenizer is missing"):
        load_manifest(b)


def test_sha_mismatch_names_the_file(tmp_path):
    b = write_bundle(tmp_path / "b")
    g = b / "int8.cpu.onnx"
    data = bytearray(g.read_bytes())
    data[0] ^= 1
    g.write_bytes(bytes(data))
    m = load_manifest(b)  # sizes still match: only hashing can tell
    verify_files(b, m, ["fp16.cpu.onnx"])
    with pytest.raises(LsaqRuntimeError, match=r"int8.cpu.onnx: sha256 mismatch"):
        verify_files(b, m, ["int8.cpu.onnx"])
    problems = verify_bundle(b)
    assert len(problems) == 1 and "int8.cpu.onnx: sha256 mismatch" in problems[0]


def test_schema_file_is_valid_draft_2020_12():
    import jsonschema

    schema = json.loads((Path(__import__("lsaq_runtime").__file__).parent / "manifest.schema.json").read_text())
    assert schema["$schema"].endswith("2020-12/schema")
    jsonschema.Draft202012Validator.check_schema(schema)


def _set_layer(m, variant: int, layer: int, precision: str, counts: dict | None = None):
    v = m["variants"][variant]
    v["precisions"][layer] = precision
    if counts is not None:
        v["layer_counts"] = counts


def test_per_part_precisions_and_their_counts():
    m = synthetic_manifest(layers=3)
    v = m["variants"][1]                       # int8 everywhere
    _set_layer(m, 1, 2, "int8/int4", {"fp16": 0, "int8": 2, "int4": 0, "mixed": 1})
    validate_manifest(m)                       # attention INT8, MLP INT4 in layer 2
    v["layer_counts"].pop("mixed")
    with pytest.raises(LsaqRuntimeError, match="layer_counts"):
        validate_manifest(m)
    _invalid(lambda m: _set_layer(m, 1, 0, "int8/int8", {"fp16": 0, "int8": 2, "int4": 0, "mixed": 1}),
             "write 'int8', not 'int8/int8'")
    _invalid(lambda m: _set_layer(m, 1, 0, "int8/int4/int4"), "variants/1/precisions/0")
    _invalid(lambda m: _set_layer(m, 1, 0, "int8/int4/int4/int8/int4"), "variants/1/precisions/0")
    # one precision per stored linear (qkv/o/gate_up/down), in its shortest form
    _set_layer(m, 1, 0, "int8/int8/int8/int4", {"fp16": 0, "int8": 1, "int4": 0, "mixed": 2})
    validate_manifest(m)
    _invalid(lambda m: _set_layer(m, 1, 0, "int8/int8/int4/int4", {"fp16": 0, "int8": 2, "int4": 0, "mixed": 1}),
             "write 'int8/int4', not 'int8/int8/int4/int4'")
    _invalid(lambda m: _set_layer(m, 1, 0, "int4/int4/int4/int4", {"fp16": 0, "int8": 2, "int4": 0, "mixed": 1}),
             "write 'int4', not 'int4/int4/int4/int4'")
    assert split_precision("int8/int4") == {"qkv": "int8", "o": "int8", "gate_up": "int4", "down": "int4"}
    assert split_precision("fp16/int8/int4/int8")["down"] == "int8"
    assert join_precision({"qkv": "int4", "o": "int4", "gate_up": "int4", "down": "int8"}) == "int4/int4/int4/int8"


def test_schema_4_bundles_still_read():
    m = synthetic_manifest(layers=3)
    m["schema_version"] = 4        # 5 only added QKV/O/GATE_UP/DOWN precisions
    validate_manifest(m)
    _invalid(lambda m: _set_layer(m, 1, 0, "int3/int4"), "variants/1/precisions/0")


def test_quality_ranking_needs_every_variant_measured():
    m = synthetic_manifest(layers=3)
    m["deployment"]["rank_by"] = "measured_quality"
    with pytest.raises(LsaqRuntimeError, match="no measured quality"):
        validate_manifest(m)
    for i, v in enumerate(m["variants"]):
        v["quality"] = {"perplexity": 20.0 + i, "tokens": 100}
    validate_manifest(m)
    _invalid(lambda m: m["deployment"].update(rank_by="bits"), "deployment/rank_by")
    m["variants"][0]["quality"]["perplexity"] = 0
    with pytest.raises(LsaqRuntimeError, match="quality/perplexity"):
        validate_manifest(m)
