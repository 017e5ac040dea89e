"""Units behind the hardening: the ONNX reader against the onnx package, verified-file stamps,
the container-aware host probe, NVML failures, bounded chat templates, terminal escapes, and the
rule that a build only ever replaces an LSAQ bundle."""

from __future__ import annotations

import json
import os
import shutil
import time

import onnx
import pytest

from lsaq_runtime.chat_template import render
from lsaq_runtime.errors import LsaqRuntimeError, printable
from lsaq_runtime.integrity import safetensors_index, verify_files
from lsaq_runtime.manifest import load_manifest, replace_refusal
from lsaq_runtime.onnx_proto import GraphFormatError, read_model
from lsaq_runtime.probe import cgroup_limit, choose_device, probe_gpus, probe_host
from test_runtime_probe import HOST, TWO, FakeNVML


def test_onnx_reader_agrees_with_onnx(tiny_bundle):
    m = load_manifest(tiny_bundle)
    for v in (m["variants"][0], m["variants"][-1]):
        for info in v["providers"].values():
            data = (tiny_bundle / info["graph"]).read_bytes()
            ours = read_model(data)
            ref = onnx.load_from_string(data)
            assert ours.ir_version == ref.ir_version
            assert ours.opsets == {o.domain: o.version for o in ref.opset_import}
            assert [(n.op_type, n.domain, list(n.input)) for n in ref.graph.node] == \
                [(n.op_type, n.domain, n.inputs) for n in ours.nodes]
            inits = ours.initializers
            assert set(inits) == {t.name for t in ref.graph.initializer}
            for t in ref.graph.initializer:
                mine = inits[t.name]
                assert mine.dims == list(t.dims) and mine.dtype == t.data_type
                assert mine.external == {e.key: e.value for e in t.external_data}
            for a, b in zip(ours.inputs, ref.graph.input):
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                        for d in b.type.tensor_type.shape.dim]
                assert (a.name, a.elem_type, a.dims) == (b.name, b.type.tensor_type.elem_type, dims)
            bits = [n.ints.get("bits") for n in ours.nodes if n.op_type == "MatMulNBits"]
            assert bits == [a.i for n in ref.graph.node if n.op_type == "MatMulNBits"
                            for a in n.attribute if a.name == "bits"]


@pytest.mark.parametrize("blob", [b"", b"\x0a", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                                  b"\x3a\x05abc", b"\x0b\x00"])
def test_onnx_reader_refuses_malformed(blob):
    with pytest.raises(GraphFormatError):
        read_model(blob)


def test_onnx_reader_refuses_subgraphs():
    then = onnx.helper.make_graph([], "then", [], [])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=then)
    g = onnx.helper.make_graph([node], "g", [], [])
    with pytest.raises(GraphFormatError, match="subgraph"):
        read_model(onnx.helper.make_model(g).SerializeToString())


def test_safetensors_index_matches_the_writer(tiny_bundle):
    from safetensors import safe_open

    p = tiny_bundle / "weights" / "int8.safetensors"
    idx = safetensors_index(p)
    with safe_open(str(p), framework="numpy") as f:
        assert set(idx) == set(f.keys())
        name = next(iter(idx))
        dtype, shape, off, length = idx[name]
        assert list(f.get_tensor(name).shape) == shape
        assert p.read_bytes()[off:off + length] == f.get_tensor(name).tobytes()


def test_stamps_skip_rehash_until_the_file_changes(tiny_bundle, tmp_path, monkeypatch):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    monkeypatch.setenv("LSAQ_CACHE_DIR", str(tmp_path / "cache"))
    m = load_manifest(b)
    rel = "weights/float.safetensors"
    assert verify_files(b, m, [rel])["hashed"] > 0
    assert verify_files(b, m, [rel]) == {"hashed": 0, "stamped": m["files"][[f["path"] for f in m["files"]].index(rel)]["bytes"]}
    # Same size, same mtime, different bytes: the stamp must not hide it (ctime moved).
    p = b / rel
    st = p.stat()
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    time.sleep(0.01)
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(LsaqRuntimeError, match="sha256 mismatch"):
        verify_files(b, m, [rel])
    monkeypatch.setenv("LSAQ_VERIFY_ALWAYS", "1")
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    assert verify_files(b, m, [rel])["hashed"] > 0
    assert verify_files(b, m, [rel])["hashed"] > 0  # no stamps used when asked


def _cg(tmp_path, files: dict[str, str], proc: str) -> tuple[str, str]:
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (tmp_path / "proc").write_text(proc)
    return str(root), str(tmp_path / "proc")


def test_cgroup_v2_limit_is_used(tmp_path):
    root, proc = _cg(tmp_path, {
        "memory.max": "max\n",
        "app/memory.max": str(4 << 30), "app/memory.current": str(3 << 30),
        "app/memory.stat": f"anon 1\ninactive_file {1 << 30}\n",
    }, "0::/app\n")
    assert cgroup_limit(root, proc) == (4 << 30, 2 << 30)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 67108864 kB\nMemAvailable: 33554432 kB\n")
    dev = probe_host(str(meminfo), root, proc)
    assert (dev.free_bytes, dev.total_bytes, dev.source) == (2 << 30, 4 << 30, "cgroup")


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root, proc = _cg(tmp_path, {
        "memory/memory.limit_in_bytes": str(8 << 30), "memory/memory.usage_in_bytes": str(1 << 30),
        "memory/memory.stat": "total_inactive_file 0\n"}, "4:memory:/\n")
    assert cgroup_limit(root, proc) == (8 << 30, 7 << 30)
    root, proc = _cg(tmp_path, {"memory/memory.limit_in_bytes": "9223372036854771712",
                                "memory/memory.usage_in_bytes": "100"}, "4:memory:/\n")
    assert cgroup_limit(root, proc) is None


class FlakyNVML(FakeNVML):
    def nvmlDeviceGetMemoryInfo(self, h):
        if h == 1:
            raise RuntimeError("NVMLError_Unknown")
        return super().nvmlDeviceGetMemoryInfo(h)


def test_nvml_error_midway_is_said_not_swallowed():
    notes: list[str] = []
    assert probe_gpus(FlakyNVML(TWO), environ={}, notes=notes) == []
    assert "NVML failed while reading the memory of GPU 1" in notes[0]
    import lsaq_runtime.probe as probe

    orig = probe.probe_gpus
    try:
        probe.probe_gpus = lambda notes=None: orig(FlakyNVML(TWO), environ={}, notes=notes)
        dev, out = choose_device("auto", host=HOST)
        assert dev.kind == "cpu" and any("NVML failed" in n for n in out)
        with pytest.raises(LsaqRuntimeError, match="NVML failed"):
            choose_device("cuda", host=HOST)
    finally:
        probe.probe_gpus = orig


def test_chat_template_renders_and_is_bounded():
    tpl = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}{{ eos }}"
    assert render(tpl, {"messages": [{"role": "user", "content": "hi"}], "eos": "</s>"}) == "[user] hi</s>"
    t0 = time.monotonic()
    with pytest.raises(LsaqRuntimeError, match="did not finish within 1 s"):
        render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
               {}, timeout=1)
    assert time.monotonic() - t0 < 10  # killed, not waited for
    with pytest.raises(LsaqRuntimeError, match="output exceeded"):
        render("{{ 'x' * 2000 }}", {}, max_chars=1000)


def test_printable():
    assert printable("ok\ttab\nline") == "ok\ttab\nline"
    assert printable("a\x1b[2Jb\x07\u202e") == "a\\x1b[2Jb\\x07\\u202e"
    assert printable("a\nb", newlines=False) == "a\\nb"


def test_replace_refusal(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    assert replace_refusal(b) is None
    (b / "extra").mkdir()
    assert replace_refusal(b) is None          # an empty folder holds nothing to lose
    (b / "extra" / "mine.txt").write_text("x")
    assert "extra/mine.txt" in replace_refusal(b)
    (b / "extra" / "mine.txt").unlink()
    m = json.loads((b / "manifest.json").read_text())
    m["format"] = "other"
    (b / "manifest.json").write_text(json.dumps(m))
    assert "not an LSAQ bundle" in replace_refusal(b)
    assert "not a folder" in replace_refusal(tmp_path / "nothing")
