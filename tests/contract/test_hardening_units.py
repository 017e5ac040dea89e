"""Units behind the hardening: the ONNX reader against the onnx package, verified-file stamps,
the container-aware host probe, NVML failures, bounded chat templates, terminal escapes, and the
rule that a build only ever replaces an LSAQ bundle."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest

from lsaq_runtime.chat_template import render
from lsaq_runtime.errors import LsaqRuntimeError, printable
from lsaq_runtime.integrity import safetensors_index, verify_files
from lsaq_runtime.bundle_folder import replace_refusal
from lsaq_runtime.manifest import load_manifest
from lsaq_runtime.onnx_proto import GraphFormatError, read_model
from lsaq_runtime.probe import cgroup_limit, choose_device, probe_gpus, probe_host
from factories.synthetic import FakeNVML, HOST, TWO


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


# ------------------------------------------------------------------------------- issue 24
def test_graph_check_resolves_external_data_from_the_graph_folder(tiny_bundle, tmp_path):
    """ONNX Runtime reads a graph's external data relative to the graph's folder; the check
    resolves the same way, so a graph below the root cannot read a file the manifest lists at
    the root (or, unlisted, anything else) unnoticed, even past the root-only rule."""
    from lsaq_runtime.graph_check import check_graph

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = load_manifest(b)
    v = next(x for x in m["variants"] if x["name"] == "fp16")
    info = v["providers"]["cpu"]
    data = (b / info["graph"]).read_bytes()
    check_graph(b, m, v, "cpu", data)                      # at the root: fine
    info["graph"] = "sub/fp16.cpu.onnx"
    info["files"][0] = info["graph"]
    with pytest.raises(LsaqRuntimeError, match="reads 'sub/weights/float.safetensors', which "
                                               "is not among the variant's files"):
        check_graph(b, m, v, "cpu", data)


def test_validate_refuses_graphs_below_the_root_and_second_spellings(tiny_bundle):
    from lsaq_runtime.manifest import validate_manifest

    m = json.loads((tiny_bundle / "manifest.json").read_text())
    validate_manifest(m)
    bad = json.loads(json.dumps(m))
    bad["files"].append({**bad["files"][0], "path": bad["files"][0]["path"].upper()})
    with pytest.raises(LsaqRuntimeError, match="one file on a case-insensitive disk"):
        validate_manifest(bad)
    for path in ("weights//float.safetensors", "weights/./float.safetensors", "./int8.cpu.onnx",
                 "weights/"):
        bad = json.loads(json.dumps(m))
        bad["files"][0]["path"] = path
        with pytest.raises(LsaqRuntimeError, match="not written in normal form"):
            validate_manifest(bad)
    bad = json.loads(json.dumps(m))
    bad["model"]["head_dim"] = float(bad["model"]["head_dim"])
    with pytest.raises(LsaqRuntimeError, match="is not of type 'integer'"):
        validate_manifest(bad)
    bad = json.loads(json.dumps(m))
    graph = bad["variants"][0]["providers"]["cpu"]["graph"]
    next(f for f in bad["files"] if f["path"] == graph)["bytes"] = (1 << 30) + 1
    with pytest.raises(LsaqRuntimeError, match="more than the 1024 MiB a graph"):
        validate_manifest(bad)


def test_hash_exactly_sees_a_file_replaced_while_it_was_read(tmp_path, monkeypatch):
    from lsaq_runtime import integrity

    p, other = tmp_path / "w", tmp_path / "other"
    p.write_bytes(b"a" * 1000)
    other.write_bytes(b"b" * 1000)
    sha, st = integrity.hash_exactly(p)
    assert st.st_size == 1000 and sha == integrity.sha256_file(p)
    real = integrity.os.fstat
    calls = []

    def fstat(fd):
        st = real(fd)
        if not calls:
            calls.append(1)
            os.replace(other, p)   # after the descriptor's first stat: mid-hash
        return st
    monkeypatch.setattr(integrity.os, "fstat", fstat)
    with pytest.raises(integrity.FileChanged):
        integrity.hash_exactly(p)
    monkeypatch.undo()
    assert integrity.hash_settled(p)[0] == integrity.sha256_file(p)   # the new bytes


def test_files_hashed_at_once_give_each_files_own_digest_in_order(tmp_path, monkeypatch):
    """sha256_files hashes several files at once (a model's or a bundle's, largest first):
    every digest must be that file's, in the order asked, whatever the number of threads."""
    from lsaq_runtime import integrity

    paths = []
    for i, size in enumerate([10, 5 << 20, 0, 3 << 20, 77]):   # sizes out of order, an empty one
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    want = [integrity.sha256_file(p) for p in paths]
    assert len(set(want)) == len(want)
    started = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: started.append(p) or real(p))
    for workers in (1, 2, 3, 8):
        started.clear()
        assert integrity.sha256_files(paths, workers=workers) == want, workers
        if workers > 1:   # the largest first: the wall is about the largest file's
            assert set(started[:2]) == {paths[1], paths[3]}
    assert integrity.sha256_files([]) == []


def test_resident_floor_holds_for_every_built_variant_and_refuses_less(tiny_bundle):
    from lsaq_runtime.graph_check import check_graph, resident_floor
    from lsaq_runtime.onnx_proto import read_model

    m = load_manifest(tiny_bundle)
    for v in m["variants"]:
        for prov, info in v["providers"].items():
            data = (tiny_bundle / info["graph"]).read_bytes()
            floor = resident_floor(read_model(data))
            # the compiler's estimate is above the derived floor, and the floor is most of it
            assert 0.5 * info["resident_bytes"] < floor <= info["resident_bytes"], (v["name"], prov)
            check_graph(tiny_bundle, m, v, prov, data)
            info["resident_bytes"] = floor - 1
            with pytest.raises(LsaqRuntimeError, match="understates the memory"):
                check_graph(tiny_bundle, m, v, prov, data)


def test_planner_floors_the_manifests_deployment_numbers():
    from lsaq_runtime.planner import (MIN_MARGIN_BYTES, MIN_MARGIN_FRACTION, MIN_OVERHEAD_BYTES,
                                      estimate, tokenizer_bytes)
    from factories.synthetic import synthetic_manifest

    m = synthetic_manifest()
    honest = estimate(m, m["variants"][0], "cpu", 512, 1)
    m["deployment"]["safety_margin"] = {"fraction": 0, "min_bytes": 0}
    m["deployment"]["runtime_overhead_bytes"] = {"cpu": 0, "cuda": 0}
    row = estimate(m, m["variants"][0], "cpu", 512, 1)
    # the floor, plus the loaded tokenizer (host memory, counted on CPU whatever the manifest says)
    assert row.overhead_bytes == MIN_OVERHEAD_BYTES["cpu"] + tokenizer_bytes(m)
    assert row.margin_bytes == max(int(MIN_MARGIN_FRACTION * row.predicted_bytes), MIN_MARGIN_BYTES)
    assert 0 < honest.need_bytes - row.need_bytes < honest.need_bytes   # lower, never to nothing


def test_sizes_never_print_as_exponents():
    from lsaq_runtime.sizes import format_size

    assert format_size(1010 * 2**20) == "1,010 MiB"
    assert format_size(999 * 2**20) == "999 MiB" and format_size(1.5 * 2**30) == "1.5 GiB"
    assert "e+" not in format_size(5000 * 2**40)


def test_threads_are_bounded_by_the_cpus():
    from lsaq_runtime.probe import check_threads, usable_cpus

    check_threads(None)
    check_threads(2, cpus=2)
    with pytest.raises(LsaqRuntimeError, match="--threads 3: this process may use 2 CPUs"):
        check_threads(3, cpus=2)
    assert 1 <= usable_cpus() <= os.cpu_count()


def test_sampler_refuses_what_would_make_nan_probabilities():
    import numpy as np

    from lsaq_runtime.sampling import Sampler

    logits = np.array([1.0, 3.0, 2.0], np.float32)
    for t in (float("nan"), float("inf"), 1e-310, -1.0):
        with pytest.raises(LsaqRuntimeError, match="temperature"):
            Sampler(t)
    for seed in (-1, 2**64):
        with pytest.raises(LsaqRuntimeError, match="seed"):
            Sampler(0.5, seed=seed)
    # huge logits over a small temperature: still a distribution, not NaN
    assert Sampler(1e-5, seed=0)(np.array([3e4, 1e4, -3e4], np.float32)) == 0
    assert Sampler(0.7, seed=1)(logits) in (0, 1, 2)
    with pytest.raises(LsaqRuntimeError, match="NaN or infinite logits"):
        Sampler()(np.array([0.0, np.nan], np.float32))


def test_a_rust_panic_becomes_one_error_and_its_text_stays_off_the_terminal(tmp_path, capfd):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from lsaq_runtime import rustguard

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), "isolated")
    with pytest.raises(LsaqRuntimeError, match="crashed on it .*retry-limit"):
        rustguard.call(tok.encode, "a" * 40 + "b", what="the tokenizer")
    assert rustguard.call(tok.encode, "aaa", what="x").ids    # still usable
    out, err = capfd.readouterr()
    assert "panicked" not in err and "backtrace" not in err, err

    def noisy():
        os.write(2, b"other thread's line\n")    # written inside the window: kept
        return 1
    assert rustguard.call(noisy, what="x") == 1
    assert "other thread's line" in capfd.readouterr().err


def test_replace_refusal_needs_the_full_check(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    assert replace_refusal(b) is None
    p = b / "weights" / "int4.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    assert "sha256 mismatch" in replace_refusal(b)
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "manifest.json").write_text('{"format":"lsaq-bundle","files":[{"path":"thesis.tex"}]}')
    assert "does not pass the bundle check" in replace_refusal(d)


def test_http_log_lines_are_one_line_and_throttled(capsys, monkeypatch):
    import logging

    import lsaq_runtime.serve.server as server

    monkeypatch.delenv("LSAQ_DEBUG", raising=False)
    handler = server._OneLineLog()
    log = logging.getLogger("test-lsaq-http")
    log.handlers[:], log.propagate = [handler], False
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        for _ in range(500):
            log.error("socket.accept() out of system resource", exc_info=True)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "Too many open files" in err
    monkeypatch.setattr(server, "LOG_REPEAT_S", 0.0)
    log.error("socket.accept() out of system resource")
    assert "(499 more like it" in capsys.readouterr().err


def test_the_connection_cap_fits_the_descriptor_limit():
    import resource

    import lsaq_runtime.serve.server as server

    cap = server.connection_cap(10**6)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert cap == soft - server.FD_RESERVE          # within what the process may open
    assert hard == resource.RLIM_INFINITY or soft == hard   # raised to the hard limit
    assert server.connection_cap(40) == 40


def test_a_variants_files_are_hashed_together_and_a_bad_one_is_named(tiny_bundle, tmp_path,
                                                                      monkeypatch):
    """verify_files hashes a variant's files on several threads (a 7B bundle's stores in the
    time of the largest): every file is still checked, and the damaged one is the one named."""
    import threading

    from lsaq_runtime import integrity

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    monkeypatch.setenv("LSAQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("lsaq_runtime.probe.usable_cpus", lambda: 4)
    m = load_manifest(b)
    rels = sorted(f["path"] for f in m["files"] if f["path"].startswith("weights/"))
    assert len(rels) >= 2
    seen, real = [], integrity.hash_settled
    monkeypatch.setattr(integrity, "hash_settled",
                        lambda p: seen.append((p.name, threading.current_thread().name))
                        or real(p))
    sizes = {f["path"]: f["bytes"] for f in m["files"]}
    assert verify_files(b, m, rels)["hashed"] == sum(sizes[r] for r in rels)
    assert sorted(n for n, _ in seen) == sorted(Path(r).name for r in rels)
    assert all(t.startswith("lsaq-sha256") for _, t in seen)
    p = b / rels[-1]
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    monkeypatch.setenv("LSAQ_VERIFY_ALWAYS", "1")
    with pytest.raises(LsaqRuntimeError, match=f"{p.name}: sha256 mismatch"):
        verify_files(b, m, rels)
