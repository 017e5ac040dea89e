"""The streaming safetensors writer: readable by safetensors, refs point at the exact bytes."""

import json
import struct

import numpy as np
import pytest
from safetensors import safe_open

from lsaq_compile.store import SafetensorsWriter


def _arrays():
    rng = np.random.default_rng(0)
    return {
        "a.float16": rng.standard_normal((7, 5)).astype(np.float16),
        "b.float32": rng.standard_normal(3).astype(np.float32),
        "c.uint8": rng.integers(0, 255, (4, 2, 8), dtype=np.uint8),
        "d.transposed": np.asarray(rng.standard_normal((6, 4)), np.float32).T,  # not contiguous
    }


def test_written_file_reads_back_and_refs_point_at_the_bytes(tmp_path):
    arrays = _arrays()
    with SafetensorsWriter(tmp_path, "weights/x.safetensors", list(arrays)) as w:
        refs = {k: w.add(k, a) for k, a in arrays.items()}
    path = tmp_path / "weights/x.safetensors"
    raw = path.read_bytes()
    with safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(arrays)
        for k, a in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(k), a)
            r = refs[k]
            assert r.file == "weights/x.safetensors"
            assert r.dtype == a.dtype.name and r.shape == a.shape and r.length == a.nbytes
            got = np.frombuffer(raw[r.offset:r.offset + r.length], dtype=a.dtype).reshape(a.shape)
            np.testing.assert_array_equal(got, a)
    # Data section is exactly the tensors, back to back, starting 8-aligned.
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert (8 + header_len) % 8 == 0
    assert len(raw) == 8 + header_len + sum(a.nbytes for a in arrays.values())
    json.loads(raw[8:8 + header_len])  # space padding keeps it valid JSON


def test_long_names_and_many_tensors_fit_the_reserved_header(tmp_path):
    names = [f"model.layers.{i}.{'x' * 150}.weight" for i in range(300)]
    with SafetensorsWriter(tmp_path, "w.safetensors", names) as w:
        for n in names:
            w.add(n, np.zeros((2, 3), np.float32))
    with safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as f:
        assert len(list(f.keys())) == 300


def test_unplanned_or_repeated_tensor_is_refused(tmp_path):
    with pytest.raises(ValueError):
        with SafetensorsWriter(tmp_path, "w.safetensors", ["a"]) as w:
            w.add("b", np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        with SafetensorsWriter(tmp_path, "w.safetensors", ["a"]) as w:
            w.add("a", np.zeros(2, np.float32))
            w.add("a", np.zeros(2, np.float32))
    with pytest.raises(ValueError):
        with SafetensorsWriter(tmp_path, "w.safetensors", ["a"]) as w:
            w.add("a", np.zeros(2, np.float64))


def test_token_tables_quantized_by_row_chunks_are_the_whole_tables_arrays(monkeypatch):
    """The store quantizes a token table a chunk of rows at a time (a 128k-row table's float32
    copy and quantizer temporaries were a 8.8 GiB peak; quantize() bounds its row ranges and
    makes each float32 alone); the arrays must be the whole table's, a last chunk shorter than
    the others included."""
    from lsaq_compile import export_onnx as X
    from lsaq_compile import quantize as Q
    from lsaq_compile.quantize import schemes_for
    rng = np.random.default_rng(5)
    table = (rng.standard_normal((53, 96)) * rng.uniform(0.01, 1, (53, 1))).astype(np.float16)
    for kind in ("group", "channel"):
        schemes = schemes_for(kind, 32 if kind == "group" else None, kind == "channel", 32, "mse")
        for prec in ("int8", "int4"):
            sch = X.table_scheme(schemes, prec)
            whole = X._linear_arrays(table.astype(np.float32), prec, sch)
            monkeypatch.setattr(Q, "_RANGE_MAX", 8 * 96)   # 8 rows a range: 7 ranges
            seen = []
            real = Q._quantize
            monkeypatch.setattr(Q, "_quantize", lambda w, *a: seen.append(w.shape) or real(w, *a))
            got = X._linear_arrays(table, prec, sch)      # the float16 table, as the store
            monkeypatch.undo()
            assert len(seen) == 7 and max(r for r, _ in seen) <= 8
            assert got.keys() == whole.keys()
            for role in whole:
                np.testing.assert_array_equal(got[role], whole[role], err_msg=f"{kind} {prec} {role}")


def test_a_tensor_written_by_row_ranges_is_the_joined_tensor(tmp_path):
    """add_rows writes row ranges as one tensor without joining them in memory: the same file
    as add() of their concatenation; ranges that do not stack are refused."""
    arrays = _arrays()
    parts = {k: [a[:2], a[2:3], a[3:]] if a.ndim > 1 else [a] for k, a in arrays.items()}
    with SafetensorsWriter(tmp_path, "whole.safetensors", list(arrays)) as w:
        whole = {k: w.add(k, a) for k, a in arrays.items()}
    with SafetensorsWriter(tmp_path, "rows.safetensors", list(arrays)) as w:
        rows = {k: w.add_rows(k, p) for k, p in parts.items()}
    assert (tmp_path / "rows.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    assert [(r.offset, r.length, r.shape) for r in rows.values()] == \
        [(r.offset, r.length, r.shape) for r in whole.values()]
    with SafetensorsWriter(tmp_path, "bad.safetensors", ["x"]) as w:
        with pytest.raises(ValueError, match="row ranges differ"):
            w.add_rows("x", [np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32)])
