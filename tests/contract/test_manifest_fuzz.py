"""Property-based fuzzing of the manifest reader and planner: a few thousand mutated manifests.

Each example takes a valid synthetic bundle's manifest and damages it: a value anywhere in the
tree replaced by arbitrary JSON (huge integers, NaN, infinities, deep nesting, strings with
control characters), a key removed or added, or the serialized bytes truncated or flipped. The
reader, the planner and the CLI's dry run may accept it or refuse it, but only ever with an
LsaqRuntimeError: no other exception escapes.
"""

from __future__ import annotations

import atexit
import copy
import json
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.manifest import load_manifest
from lsaq_runtime.planner import plan
from lsaq_runtime.probe import Device, simulated
from factories.synthetic import write_bundle

# A module-level folder (hypothesis's examples cannot take function-scoped fixtures), removed
# when the process ends: every test run left one in the system's temporary folder.
_ROOT = Path(tempfile.mkdtemp(prefix="lsaq-fuzz-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
_BUNDLE = write_bundle(_ROOT / "b")
_VALID = json.loads((_BUNDLE / "manifest.json").read_text())
_HOST = Device("cpu", None, "fuzz host", 64 * 2**30, 16 * 2**30, "test")


def _paths(node, prefix=()):
    """Every place in the JSON tree (dict keys and list indices)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_ALL_PATHS = [p for p in _paths(_VALID) if p]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, -1, 1, 2**31, 2**53, 2**63, 2**64, 10**25]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["../x", "/etc/passwd", "a\x1bb", "fp16", "int4", ""]),
)
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)), max_leaves=12)


def _set(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _delete(tree, path):
    node = tree
    for p in path[:-1]:
        node = node[p]
    if isinstance(node, dict):
        del node[path[-1]]
    else:
        node.pop(path[-1])


@st.composite
def damaged_manifests(draw) -> bytes:
    m = copy.deepcopy(_VALID)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(m) if p]
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "nest"]))
        try:
            if action == "replace":
                _set(m, path, draw(json_values))
            elif action == "delete":
                _delete(m, path)
            elif action == "add":
                _set(m, path[:-1] + (draw(st.text(max_size=6)),), draw(json_values)) \
                    if isinstance(_get(m, path[:-1]), dict) else None
            else:  # deep nesting in place of a value, spliced into the text below
                _set(m, path, "__NEST__")
        except (KeyError, IndexError, TypeError):
            pass
    depth = draw(st.sampled_from([10, 1000, 100_000]))
    raw = json.dumps(m, allow_nan=True).replace('"__NEST__"', "[" * depth + "]" * depth).encode()
    tail = draw(st.sampled_from(["keep", "keep", "keep", "truncate", "flip"]))
    if tail == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif tail == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    return raw


def _get(tree, path):
    node = tree
    for p in path:
        node = node[p]
    return node


@settings(max_examples=3000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(raw=damaged_manifests(), context=st.one_of(st.none(), st.integers(1, 10**9)),
       budget=st.one_of(st.none(), st.integers(0, 2**62)))
def _fuzz_once(stats, raw, context, budget):
    (_BUNDLE / "manifest.json").write_bytes(raw)
    try:
        m = load_manifest(_BUNDLE)
        host = _HOST if budget is None else simulated(_HOST, budget)   # a dry run's device
        d = plan(m, host, context=context, budget=budget)
        for r in d.rows:  # whatever was accepted yields meaningful numbers
            assert r.need_bytes is None or (isinstance(r.need_bytes, int) and r.need_bytes >= 0)
        if d.chosen is None:
            assert d.reason
        stats["accepted"] += 1
    except LsaqRuntimeError as e:
        assert str(e)
        stats["refused"] += 1


def test_only_lsaq_errors_escape():
    stats = {"accepted": 0, "refused": 0}
    _fuzz_once(stats)
    print(f"fuzzed manifests: {stats}")
    # The mutations must reach both outcomes, or the test proves little.
    assert stats["refused"] > 100 and stats["accepted"] > 10, stats
