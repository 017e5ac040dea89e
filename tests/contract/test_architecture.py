"""The code's shape: no import cycles, the runtime independent of the compiler (and of torch),
the bundle format spelled in one module, and BUNDLE_FORMAT.md true to it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from lsaq_runtime import format as fmt

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"lsaq_runtime": ROOT / "runtime" / "lsaq_runtime", "lsaq_compile": ROOT / "lsaq_compile"}


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> its file, for every module of `package`."""
    base = PACKAGES[package]
    out = {}
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, anywhere in its file (inside functions too), as absolute
    dotted names; `from x import y` counts x and, when it is a module, x.y."""
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    return {m: {i for i in _imports(m, p) if i in mods and i != m} for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph`, or None (a depth-first search)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    graph = _graph(package)
    assert len(graph) > 5
    # a package importing its own submodules is no cycle: only edges between modules count
    graph = {m: {n for n in deps if not m.startswith(n + ".") and not n.startswith(m + ".")}
             for m, deps in graph.items()}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_import_of_the_package_resolves(package):
    """An import of the package's own modules names one that exists (imports inside
    functions run late: a module that moved would otherwise fail only when called)."""
    mods = _modules(package)
    for module, path in mods.items():
        for imp in _imports(module, path):
            if imp.split(".")[0] != package or imp in mods:
                continue
            parent = imp.rsplit(".", 1)[0]   # `from .m import name`: m.name is no module
            assert parent in mods, f"{module} imports {imp}, which does not exist"


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_runtime_imports_nothing_heavy_or_from_the_compiler():
    for module, path in _modules("lsaq_runtime").items():
        for imp in _imports(module, path):
            top = imp.split(".")[0]
            assert top not in ("lsaq_compile", "torch", "transformers", "onnx"), \
                f"{module} imports {imp}"


def test_format_module_imports_only_the_standard_library():
    path = PACKAGES["lsaq_runtime"] / "format.py"
    tops = {i.split(".")[0] for i in _imports("lsaq_runtime.format", path)}
    assert tops <= {"__future__", "pathlib", "re", "typing"}, tops


# ------------------------------------------------------------------------------- spelled once
# Fragments that only the format module may write in code: tensor keys and graph I/O names.
FORMAT_SPELLINGS = [r"model\.layers\.\{", r"past_key_values\.", r"present\.\{", r"\.weight_kn",
                    r"\.qweight", r"\.scales", r"\.zero_points", r"num_logits_to_keep",
                    r"total_sequence_length", r"seqlens_k", r"lm_head\.int8",
                    r"model\.embed_tokens\.", r"lm_head\.weight", r"^input_ids$", r"^logits$"]


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """String constants of a file's code, docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    out, parts = [], set()
    for n in ast.walk(tree):
        if isinstance(n, ast.JoinedStr):   # an f-string: its fields read as "{}"
            parts.update(id(v) for v in n.values)
            out.append((n.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                          for v in n.values)))
    out += [(n.lineno, n.value) for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str) and id(n) not in docs | parts]
    return out


def test_no_other_module_spells_a_tensor_key_or_an_io_name():
    found = []
    for package in PACKAGES:
        for module, path in _modules(package).items():
            if module == "lsaq_runtime.format":
                continue
            for line, text in _code_strings(path):
                for pat in FORMAT_SPELLINGS:
                    if re.search(pat, text):
                        found.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not found, "\n".join(found)


def test_keys_parse_back():
    for i, lin, p in [(0, "self_attn.qkv_proj", "fp16"), (11, "mlp.down_proj", "int4"),
                      (3, "mlp.gate_up_proj", "int8"), (7, "self_attn.o_proj", "fp32")]:
        for key in fmt.linear_keys(i, lin, p, symmetric=False).values():
            assert fmt.parse_linear_key(key) == (i, lin, p)
            assert fmt.parse_table_key(key) is None
    for table in fmt.TABLES:
        for p in fmt.PRECISIONS:
            for key in fmt.table_keys(table, p, symmetric=False).values():
                assert fmt.parse_table_key(key) == (table, p)
                assert fmt.parse_linear_key(key) is None
    assert fmt.parse_table_key(f"{fmt.HEAD_INT8}.qweight") == ("lm_head", "int8")
    assert fmt.parse_linear_key(fmt.norm_key(0, "input_layernorm")) is None
    assert fmt.parse_table_key(fmt.FINAL_NORM) is None
    assert set(fmt.linear_keys(0, "mlp.down_proj", "int8", symmetric=True)) == \
        {"qweight", "scales", "scales_f32"}


def test_graph_io_and_linears():
    assert fmt.graph_inputs(2)[:4] == list(fmt.STATIC_INPUTS)
    assert len(fmt.graph_inputs(2)) == 4 + 4 and len(fmt.graph_outputs(2)) == 1 + 4
    assert fmt.LINEAR_NAMES == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                "mlp.down_proj")
    assert set(fmt.FUSED_LINEARS) == {"self_attn.qkv_proj", "mlp.gate_up_proj"}
    assert fmt.STORED_OF["up_proj"] == "mlp.gate_up_proj"
    assert list(fmt.LINEAR_PART.values()) == list(fmt.PARTS)
    shape = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128)
    assert fmt.layer_linear_params(**shape) == 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128
    # 2 layers, tied: linears and two norms a layer, the final norm, one table
    assert fmt.parameter_count(2, **shape, vocab=100, tied=True) == \
        2 * (fmt.layer_linear_params(**shape) + 2 * 64) + 64 + 100 * 64


# ------------------------------------------------------------------------------- BUNDLE_FORMAT.md
DOC = PACKAGES["lsaq_runtime"] / "BUNDLE_FORMAT.md"


def test_bundle_format_doc_states_the_schema_version_in_code():
    text = DOC.read_text(encoding="utf-8")
    stated = {int(v) for v in re.findall(r"schema[_ ]version[\"`*: ]*(\d+)", text, re.I)}
    assert stated, "BUNDLE_FORMAT.md does not state its schema version"
    assert stated == {fmt.SCHEMA_VERSION}, (stated, fmt.SCHEMA_VERSION)


def test_bundle_format_doc_names_exist_in_the_format_module():
    """Every `format.NAME` the document refers to is defined by the format module."""
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`format\.([A-Za-z_][A-Za-z0-9_]*)`", text))
    assert named, "BUNDLE_FORMAT.md refers to no name of lsaq_runtime.format"
    missing = sorted(n for n in named if not hasattr(fmt, n))
    assert not missing, missing


def test_what_benchmarks_examples_and_tests_import_exists():
    """Every name a benchmark, example or test imports from the two packages or from the test
    factories exists (they import inside functions too, where a moved name fails only when run)."""
    import importlib
    import importlib.util

    ours = ("lsaq_compile", "lsaq_runtime", "factories", "conftest")
    missing = []
    for folder in ("benchmarks", "examples", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] in ours):
                    continue
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as e:
                    missing.append(f"{path.relative_to(ROOT)}: {node.module} ({e})")
                    continue
                missing += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(mod, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert not missing, missing
