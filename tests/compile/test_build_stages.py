"""The compiler's stages: one signature in pipeline order, a job record that round-trips, a
measurement log that refuses other inputs and never passes a cut line off as a result, a
manifest writer that is a pure function, quantization settings read in one place."""

import builtins
import copy
import inspect
import json

import pytest

from lsaq_compile import stages
from lsaq_compile.errors import LsaqError
from lsaq_compile.job import Job, MeasurementLog
from lsaq_compile.plan import check_ladder
from lsaq_compile.profiles import Profile
from lsaq_compile.quantize import QuantSettings, schemes_for
from lsaq_compile.stages import writer


def test_stages_in_pipeline_order_with_one_signature():
    names = [s.NAME for s in stages.PIPELINE]
    assert names == ["source", "calibration", "scoring", "plan", "quantize", "store", "graph",
                     "writer"]
    for s in stages.PIPELINE:
        assert list(inspect.signature(s.run).parameters) == ["job", "ctx"], s.NAME


def test_job_record_round_trips(tmp_path):
    job = Job(tmp_path, {"model": "abc", "profile": {"name": "x"}})
    job.finish("source", {"model": "m"}).finish("calibration", {"windows_sha256": "w"})
    back = Job.load(tmp_path)
    assert back.done == ["source", "calibration"] and back.outputs == job.outputs
    assert back.key == job.key
    back.check_inputs({"model": "abc", "profile": {"name": "x"}})
    with pytest.raises(LsaqError, match=r"other inputs \(profile differ\)"):
        back.check_inputs({"model": "abc", "profile": {"name": "y"}})
    (tmp_path / "job.json").write_text("{not json")
    with pytest.raises(LsaqError, match="cannot be read"):
        Job.load(tmp_path)


def test_a_build_resumed_on_another_device_is_refused_naming_the_device(tmp_path, monkeypatch):
    """A GPU's float16 passes measure other numbers than a CPU's float32: the job record names
    the device it ran on, and resuming it on another one says so in one line."""
    from types import SimpleNamespace

    from lsaq_compile.stages.source import job_inputs

    ctx = SimpleNamespace(source=SimpleNamespace(fingerprint=lambda: "m"), profile=Profile(),
                          metric="sensitivity", scores_given=None, chat_template=None, device="cpu")
    job = Job(tmp_path, job_inputs(ctx))
    job.check_inputs(job_inputs(ctx))
    monkeypatch.setattr("lsaq_compile.devices.device_type", lambda d: "cuda")
    with pytest.raises(LsaqError, match=r"other inputs \(device differ\)"):
        job.check_inputs(job_inputs(ctx))


def test_measurement_log_keeps_whole_lines_and_refuses_other_inputs(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MeasurementLog(path, "key-1")
    log.start()
    log.append(("layer", 0, "qkv"), {"int8": 1e-5, "int4": 2e-3})
    log.append(("table", "lm_head"), {"int8": 3e-6, "int4": 4e-4})
    with open(path, "a") as f:          # what a kill in the middle of a write leaves
        f.write('{"key": ["layer", 0, "o"], "cost": {"int8": 1.0')
    known = MeasurementLog(path, "key-1").read()
    assert known == {("layer", 0, "qkv"): {"int8": 1e-5, "int4": 2e-3},
                     ("table", "lm_head"): {"int8": 3e-6, "int4": 4e-4}}
    with pytest.raises(LsaqError, match="other inputs"):
        MeasurementLog(path, "key-2").read()


def test_measure_reuses_known_and_records_new():
    """sensitivity.measure with part of the results known measures only the rest."""
    from lsaq_compile import sensitivity

    class Meter:                       # stands in for KLMeter: a cost per plan, counted
        class spec:
            num_layers = 2
        source, tokens = None, 10
        calls = 0

        def kl(self, precisions, tables=None):
            Meter.calls += 1
            return 0.1 * len([p for p in precisions if p != "fp16"]) + 0.01 * Meter.calls

    known = {("layer", 0, "attn"): {"int8": 7.0, "int4": 8.0}}
    recorded = []
    sens = sensitivity.measure(Meter(), units=("attn", "mlp"), known=known,
                               record=lambda k, c: recorded.append(k))
    assert sens.cost["attn"][0] == {"int8": 7.0, "int4": 8.0}
    assert Meter.calls == 2 * 3                  # three units measured, two precisions each
    assert recorded == [("layer", 0, "mlp"), ("layer", 1, "attn"), ("layer", 1, "mlp")]


class _Spec:
    name, architecture = "tiny", "LlamaForCausalLM"
    num_layers, hidden_size, intermediate_size = 2, 64, 128
    num_heads, num_kv_heads, head_dim = 4, 2, 16
    vocab_size, max_position_embeddings, tie_word_embeddings = 512, 256, False


def _inputs():
    variant = {"name": "fp16", "rank": 0, "precisions": ["fp16", "fp16"],
               "layer_counts": {"fp16": 2, "int8": 0, "int4": 0, "mixed": 0}, "avg_bits": 16.0,
               "providers": {}}
    return dict(spec=_Spec(), source={"kind": "hf", "path": "/m", "sha256": "0" * 64},
                profile=Profile(), variants=[variant],
                files=[{"path": "fp16.cpu.onnx", "bytes": 1, "sha256": "1" * 64}],
                tokenizer={"bos_token_id": 1}, scores={"metric": "jaccard"},
                schemes={"int8": "int8-channel-sym", "int4": "int4-g32-asym-mse-act"},
                table_schemes={"int8": "int8-channel-sym", "int4": "int4-g32-asym"},
                max_context=256, num_parameters=123, rope_switch=None,
                clip_calibration=None, float16_check=None)


def test_manifest_writer_is_a_pure_function(monkeypatch):
    args = _inputs()
    before = copy.deepcopy(args["variants"]), copy.deepcopy(args["files"])

    def no_io(*a, **k):
        raise AssertionError("the manifest writer touched a file")
    monkeypatch.setattr(builtins, "open", no_io)
    kw = {k: v for k, v in args.items() if k not in ("spec", "source", "profile", "variants",
                                                      "files")}
    a = writer.manifest(args["spec"], args["source"], args["profile"], args["variants"],
                        args["files"], **kw)
    b = writer.manifest(args["spec"], args["source"], args["profile"], args["variants"],
                        args["files"], **kw)
    monkeypatch.undo()
    assert a == b and json.loads(json.dumps(a)) == a
    assert (args["variants"], args["files"]) == before          # its inputs are not changed
    a["variants"][0]["name"] = "changed"                         # nor shared with the output
    assert args["variants"][0]["name"] == "fp16"
    assert a["model"]["num_parameters"] == 123 and a["files"] == args["files"]
    assert a["quantization"]["int4"] == "int4-g32-asym-mse-act"
    assert a["quantization"]["tables"] == "ladder"          # the default profile's
    assert "rope_switch_length" not in a["model"] and "build_checks" not in a
    assert writer.manifest(args["spec"], args["source"], args["profile"], args["variants"],
                           args["files"], **{**kw, "rope_switch": 128})["model"][
        "rope_switch_length"] == 128


def test_quality_ranking_is_pure():
    class Calib:
        source, prefix = "builtin:x", (1,)

    args = _inputs()
    kw = {k: v for k, v in args.items() if k not in ("spec", "source", "profile", "variants",
                                                      "files")}
    v4 = {**args["variants"][0], "name": "int4", "rank": 1, "precisions": ["int4", "int4"]}
    m = writer.manifest(args["spec"], args["source"], args["profile"],
                        [args["variants"][0], v4], args["files"], **kw)
    before = copy.deepcopy(m)
    q = {"fp16": {"perplexity": 10.0, "tokens": 6, "kl_fp16": 0.0},
         "int4": {"perplexity": 11.0, "tokens": 6, "kl_fp16": 0.2}}
    ranked = writer.with_quality(m, q, {"int4": 0.19}, Calib(), (2, 4))
    assert m == before
    assert [v["name"] for v in ranked["variants"]] == ["fp16", "int4"]
    assert ranked["variants"][1]["quality"] == {**q["int4"], "kl": 0.19}
    assert ranked["deployment"]["rank_by"] == "kl_fp16"
    assert ranked["deployment"]["quality"]["windows"] == 2


def test_writer_rebuilds_a_built_manifest(tiny_bundle):
    """The manifest of a real build is the writer's function of that build's pieces."""
    from lsaq_compile.bundle import read_manifest

    m = read_manifest(tiny_bundle)
    prof = Profile(name=m["deployment"]["profile"])
    q = m["quantization"]
    for k in ("scheme", "symmetric", "cpu_accuracy_level", "cpu_lm_head", "clip"):
        setattr(prof.quantization, k, q[k])
    prof.quantization.block_size = q["block_size"] or 0
    prof.quantization.group_size = q["group_size"] or prof.quantization.group_size
    prof.build.ladder = "full"
    spec = _Spec()
    mm = m["model"]
    for key, attr in (("num_layers", "num_layers"), ("hidden_size", "hidden_size"),
                      ("intermediate_size", "intermediate_size"),
                      ("num_attention_heads", "num_heads"),
                      ("num_key_value_heads", "num_kv_heads"), ("head_dim", "head_dim"),
                      ("vocab_size", "vocab_size"), ("name", "name"),
                      ("architecture", "architecture"),
                      ("max_position_embeddings", "max_position_embeddings"),
                      ("tie_word_embeddings", "tie_word_embeddings")):
        setattr(spec, attr, mm[key])
    tok = {k: v for k, v in m["tokenizer"].items() if k != "dir"}
    again = writer.manifest(spec, mm["source"], prof, m["variants"], m["files"], tokenizer=tok,
                            scores=m["scores"], schemes={p: q[p] for p in ("int8", "int4")},
                            table_schemes=q["table_schemes"], max_context=mm["max_context"],
                            num_parameters=mm["num_parameters"],
                            clip_calibration=q["clip_calibration"],
                            float16_check=(m.get("build_checks") or {}).get("float16"))
    assert again == m


def test_quantization_settings_read_once():
    prof = Profile()
    s = QuantSettings.from_profile(prof.quantization)
    q = prof.quantization
    assert s.schemes() == schemes_for(q.scheme, q.group_size, q.symmetric, q.block_size or None,
                                      q.clip)
    manifest_q = {"scheme": "group", "group_size": 32, "symmetric": False, "block_size": 32,
                  "clip": "mse-act"}
    assert QuantSettings.from_manifest(manifest_q) == s
    assert QuantSettings.from_manifest(None).schemes() == schemes_for("channel")


def test_ladder_kind_checked_in_one_place():
    check_ladder("bytes", "sensitivity")
    check_ladder("paper", "jaccard")
    with pytest.raises(LsaqError, match="unknown ladder 'half'"):
        check_ladder("half")
    with pytest.raises(LsaqError, match="but the scores are jaccard"):
        check_ladder("bytes", "jaccard")
    p = Profile(name="p")
    p.build.ladder = "half"
    with pytest.raises(LsaqError, match="profile 'p': unknown ladder"):
        p.validate()


def test_float16_check_not_run_where_the_model_cannot_fit(monkeypatch):
    """A 7B model's float32 graph cannot run on a 24 GiB workstation: the check is skipped, said,
    and the float16 graphs keep the float32 residual stream (never the unchecked float16 one)."""
    from types import SimpleNamespace

    import lsaq_runtime.probe

    from lsaq_compile.stages import graph

    monkeypatch.setattr(lsaq_runtime.probe, "probe_host",
                        lambda: SimpleNamespace(free_bytes=24 << 30))
    said = []
    facts = graph.unchecked_if_too_large(SimpleNamespace(params=7_000_000_000), said.append)
    assert facts == {"checked": False, "residual_dtype": "float32",
                     "why": "the float32 graph needs about 39.1 GiB, 24.0 GiB is available"}
    assert said and "float32 residual" in said[0]
    assert graph.unchecked_if_too_large(SimpleNamespace(params=135_000_000), said.append) is None
