"""Bad and hostile inputs, each through the command a user runs: one clear line, exit code 2.

Every case sets up one problem (in a manifest, a graph, the weights, the tokenizer, the chat
template, the model inputs, the output folder, the disk), runs `lsaq-run` or `lsaq-compile`
in-process, and asserts the exit code, the first line of stderr, and that no traceback was
printed. The data-loss and silent-corruption cases of issue 8 are among them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from lsaq_compile.cli import main as compile_main
from lsaq_runtime.cli import main as run_main

PROMPT = "the quick brown fox"


# ------------------------------------------------------------------------------- helpers
def manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def save(b: Path, m: dict) -> None:
    (b / "manifest.json").write_text(json.dumps(m))


def rehash(b: Path, rel: str) -> None:
    """Make the manifest agree with a changed file, as an attacker who edits both would."""
    m = manifest(b)
    data = (b / rel).read_bytes()
    for f in m["files"]:
        if f["path"] == rel:
            f["bytes"], f["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    save(b, m)


def variant(m: dict, name: str) -> dict:
    return next(v for v in m["variants"] if v["name"] == name)


def edit_graph(b: Path, rel: str, change) -> None:
    g = onnx.load(str(b / rel), load_external_data=False)
    change(g)
    (b / rel).write_bytes(g.SerializeToString())
    rehash(b, rel)


def external(g, name: str) -> dict:
    t = next(t for t in g.graph.initializer if t.name == name)
    return {e.key: e for e in t.external_data}


def first_int8_weight(g) -> str:
    return next(t.name for t in g.graph.initializer if t.name.endswith(".int8.qweight"))


def run_cli(capsys, which: str, args: list) -> tuple[int, str, str]:
    if which == "run":
        code = run_main([str(a) for a in args])
    else:
        try:
            compile_main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------- cases
# Each: (id, command, setup(ctx) -> args, expected code, text the first stderr line contains)
CASES = []


def case(id_, which="run", code=2):
    def deco(fn):
        CASES.append(pytest.param(which, fn, code, fn.__doc__, id=id_))
        return fn
    return deco


def _gen(b, *extra):
    return [b, PROMPT, "-n", "2", "--device", "cpu", *extra]


# -- manifest
@case("manifest-missing")
def _(c):
    """manifest.json: missing"""
    (c.bundle / "manifest.json").unlink()
    return _gen(c.bundle)


@case("manifest-not-json")
def _(c):
    """not valid JSON"""
    (c.bundle / "manifest.json").write_text("{oops")
    return _gen(c.bundle)


@case("manifest-deeply-nested")
def _(c):
    """JSON nested too deeply"""
    (c.bundle / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    return _gen(c.bundle)


@case("manifest-huge-integer")
def _(c):
    """an integer of 5000 digits"""
    text = (c.bundle / "manifest.json").read_text()
    (c.bundle / "manifest.json").write_text(text.replace('"num_layers": 4', '"num_layers": ' + "9" * 5000, 1))
    return _gen(c.bundle)


@case("manifest-nan")
def _(c):
    """NaN is not a number JSON allows"""
    text = (c.bundle / "manifest.json").read_text()
    (c.bundle / "manifest.json").write_text(text.replace('"fraction": 0.1', '"fraction": NaN', 1))
    return _gen(c.bundle)


@case("manifest-infinite-float")
def _(c):
    """1e999 overflows a float"""
    text = (c.bundle / "manifest.json").read_text()
    (c.bundle / "manifest.json").write_text(text.replace('"fraction": 0.1', '"fraction": 1e999', 1))
    return _gen(c.bundle)


@case("manifest-too-large")
def _(c):
    """more than the 16 MiB a manifest may have"""
    m = manifest(c.bundle)
    m["padding"] = "x" * (17 << 20)
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-not-utf8")
def _(c):
    """not UTF-8"""
    (c.bundle / "manifest.json").write_bytes(b'{"format": "\xff\xfe"}')
    return _gen(c.bundle)


@case("manifest-symlink")
def _(c):
    """not a regular file (a link or a folder)"""
    real = c.tmp / "elsewhere.json"
    shutil.move(c.bundle / "manifest.json", real)
    (c.bundle / "manifest.json").symlink_to(real)
    return _gen(c.bundle)


@case("manifest-newer-schema")
def _(c):
    """bundle written by a newer lsaq-compile"""
    m = manifest(c.bundle)
    m["schema_version"] = 99
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-older-schema")
def _(c):
    """bundle written by an older lsaq-compile"""
    m = manifest(c.bundle)
    m["schema_version"] = 1
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-missing-key")
def _(c):
    """invalid at (top level): 'variants' is a required property"""
    m = manifest(c.bundle)
    del m["variants"]
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-10x-kv-heads")
def _(c):
    """disagrees with the model's shape (2 x 4 layers x 20 KV heads"""
    m = manifest(c.bundle)
    m["model"]["num_key_value_heads"] *= 10
    m["model"]["num_attention_heads"] *= 10
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-absurd-kv")
def _(c):
    """invalid at model/head_dim"""
    m = manifest(c.bundle)
    m["model"]["head_dim"] = 1 << 40
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-path-escapes")
def _(c):
    """invalid at files/0/path"""
    m = manifest(c.bundle)
    m["files"][0]["path"] = "../../etc/passwd"
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-absolute-path")
def _(c):
    """invalid at files/0/path"""
    m = manifest(c.bundle)
    m["files"][0]["path"] = "/etc/passwd"
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-control-chars-in-path")
def _(c):
    """invalid at files/0/path"""
    m = manifest(c.bundle)
    m["files"][0]["path"] = "a\x1b[2Jb.onnx"
    save(c.bundle, m)
    return _gen(c.bundle)


@case("manifest-weight-bytes-lie")
def _(c):
    """the graph does not match manifest.json"""
    m = manifest(c.bundle)
    variant(m, "int8")["providers"]["cpu"]["weight_bytes"] += 1
    save(c.bundle, m)
    return _gen(c.bundle, "--variant", "int8")


# -- silent corruption
@case("weights-scrambled-same-size")
def _(c):
    """float.safetensors: sha256 mismatch"""
    p = c.bundle / "weights" / "float.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = os.urandom(64)
    p.write_bytes(bytes(data))
    return _gen(c.bundle)


@case("weights-truncated")
def _(c):
    """int8.safetensors: truncated"""
    p = c.bundle / "weights" / "int8.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    return _gen(c.bundle)


@case("weights-missing")
def _(c):
    """int4.safetensors: missing"""
    (c.bundle / "weights" / "int4.safetensors").unlink()
    return _gen(c.bundle)


@case("graph-scrambled-same-size")
def _(c):
    """fp16.cpu.onnx: sha256 mismatch"""
    p = c.bundle / "fp16.cpu.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    return _gen(c.bundle)


@case("providers-swapped")
def _(c):
    """layer 0's qkv computes with int4 weights, the manifest says int8"""
    m = manifest(c.bundle)
    a, b = variant(m, "int8"), variant(m, "int4")
    a["providers"], b["providers"] = b["providers"], a["providers"]
    save(c.bundle, m)
    return _gen(c.bundle, "--variant", "int8")


@case("verify-providers-swapped")
def _(c):
    """4 problem(s) (damaged, missing or mismatched files"""
    m = manifest(c.bundle)
    a, b = variant(m, "int8"), variant(m, "int4")
    a["providers"], b["providers"] = b["providers"], a["providers"]
    save(c.bundle, m)
    return ["verify", c.bundle]


@case("graph-not-onnx")
def _(c):
    """not a valid ONNX graph"""
    (c.bundle / "fp16.cpu.onnx").write_bytes(b"\xff" * 300)
    rehash(c.bundle, "fp16.cpu.onnx")
    return _gen(c.bundle)


@case("graph-wrong-tensor-offset")
def _(c):
    """points at bytes"""
    def change(g):
        ext = external(g, first_int8_weight(g))
        ext["offset"].value = str(int(ext["offset"].value) + 16)
    edit_graph(c.bundle, "int8.cpu.onnx", change)
    return _gen(c.bundle, "--variant", "int8")


@case("graph-unknown-tensor")
def _(c):
    """is not a tensor of weights/int8.safetensors"""
    def change(g):
        name = first_int8_weight(g)
        for t in g.graph.initializer:
            if t.name == name:
                t.name = name + ".renamed"
        for n in g.graph.node:
            for i, x in enumerate(n.input):
                if x == name:
                    n.input[i] = name + ".renamed"
    edit_graph(c.bundle, "int8.cpu.onnx", change)
    return _gen(c.bundle, "--variant", "int8")


@case("graph-kv-shape-lies")
def _(c):
    """past_key_values.0.key is float32"""
    def change(g):
        i = next(x for x in g.graph.input if x.name == "past_key_values.0.key")
        i.type.tensor_type.shape.dim[1].dim_value = 20
    edit_graph(c.bundle, "fp16.cpu.onnx", change)
    return _gen(c.bundle)


@case("graph-vocab-lies")
def _(c):
    """logits are float32"""
    m = manifest(c.bundle)
    m["model"]["vocab_size"] = 500
    save(c.bundle, m)
    return _gen(c.bundle)


@case("graph-fails-on-first-run")
def _(c):
    """ONNX Runtime failed while running the graph"""
    def change(g):
        for n in g.graph.node:
            # the logits' reshape target: only known at run time, so the session loads
            if n.op_type == "Constant" and n.output[0].startswith("vocab/"):
                t = n.attribute[0].t
                vals = onnx.numpy_helper.to_array(t).copy()
                vals[0] += 1
                n.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(vals))
    edit_graph(c.bundle, "fp16.cpu.onnx", change)
    return _gen(c.bundle)


# -- confinement
@case("external-data-absolute")
def _(c):
    """is not a plain relative path inside the bundle"""
    def change(g):
        external(g, "model.embed_tokens.weight")["location"].value = "/etc/passwd"
    edit_graph(c.bundle, "fp16.cpu.onnx", change)
    return _gen(c.bundle)


@case("external-data-dotdot")
def _(c):
    """is not a plain relative path inside the bundle"""
    def change(g):
        external(g, "model.embed_tokens.weight")["location"].value = "../secret.safetensors"
    edit_graph(c.bundle, "fp16.cpu.onnx", change)
    return _gen(c.bundle)


@case("external-data-unlisted-file")
def _(c):
    """which is not among the variant's files"""
    def change(g):
        external(g, "model.embed_tokens.weight")["location"].value = "tokenizer/tokenizer.json"
    edit_graph(c.bundle, "fp16.cpu.onnx", change)
    return _gen(c.bundle)


@case("weights-symlink")
def _(c):
    """is a symbolic link"""
    p = c.bundle / "weights" / "float.safetensors"
    real = c.tmp / "outside.safetensors"
    shutil.move(p, real)
    p.symlink_to(real)
    return _gen(c.bundle)


@case("weights-folder-symlink")
def _(c):
    """is a symbolic link"""
    real = c.tmp / "outside-weights"
    shutil.move(c.bundle / "weights", real)
    (c.bundle / "weights").symlink_to(real, target_is_directory=True)
    return _gen(c.bundle)


# -- tokenizer and chat template
@case("tokenizer-corrupt")
def _(c):
    """cannot be read as a tokenizer"""
    (c.bundle / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "model": 5}')
    rehash(c.bundle, "tokenizer/tokenizer.json")
    return _gen(c.bundle)


@case("tokenizer-tampered")
def _(c):
    """tokenizer.json: sha256 mismatch"""
    p = c.bundle / "tokenizer" / "tokenizer.json"
    data = bytearray(p.read_bytes())
    data[-3] = ord(" ")
    p.write_bytes(bytes(data))
    return _gen(c.bundle)


def _template(c, text: str):
    m = manifest(c.bundle)
    m["tokenizer"]["chat_template"] = text
    save(c.bundle, m)
    return _gen(c.bundle, "--chat")


@case("chat-without-template")
def _(c):
    """this bundle has no chat template (tokenizer.chat_template), so --chat cannot format"""
    m = manifest(c.bundle)
    m["tokenizer"]["chat_template"] = None
    save(c.bundle, m)
    return _gen(c.bundle, "--chat")   # the first line: refused before anything was loaded


@case("template-zero-division")
def _(c):
    """the bundle's chat template failed: ZeroDivisionError"""
    return _template(c, "{{ 1 / 0 }}")


@case("template-reaches-for-os")
def _(c):
    """the bundle's chat template failed: SecurityError"""
    return _template(c, "{{ cycler.__init__.__globals__.os.system('true') }}")


@case("template-endless-loops")
def _(c):
    """chat template did not finish within 1 s"""
    return _template(c, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                        "{% endfor %}")


@case("template-memory-bomb")
def _(c):
    """the bundle's chat template failed: it ran out of its memory allowance"""
    return _template(c, "{{ 'x' * 4000000000 }}")


@case("template-output-bomb")
def _(c):
    """the bundle's chat template failed: its output exceeded the limit"""
    return _template(c, "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}")


@case("template-raises")
def _(c):
    """the bundle's chat template failed: TemplateError: no system role"""
    return _template(c, "{{ raise_exception('no system role') }}")


@case("template-syntax")
def _(c):
    """the bundle's chat template failed: TemplateSyntaxError"""
    return _template(c, "{% for %}")


# -- model inputs
@case("context-past-max")
def _(c):
    """larger than this bundle's max_context"""
    return _gen(c.bundle, "--context", "100000")


@case("prompt-longer-than-context")
def _(c):
    """but the context is 8"""
    return [c.bundle, PROMPT * 10, "--device", "cpu", "--context", "8"]


@case("prompt-empty")
def _(c):
    """the prompt is empty"""
    return [c.bundle, "", "--device", "cpu"]


@case("variant-unknown")
def _(c):
    """unknown variant 'int3'"""
    return _gen(c.bundle, "--variant", "int3")


@case("budget-not-a-size")
def _(c):
    """not a size: 'lots'"""
    return _gen(c.bundle, "--memory-budget", "lots")


@case("budget-too-small")
def _(c):
    """no variant fits"""
    return _gen(c.bundle, "--memory-budget", "1MB")


@case("device-unknown")
def _(c):
    """unknown device 'tpu'"""
    return [c.bundle, PROMPT, "--device", "tpu"]


@case("device-cuda-without-gpu")
def _(c):
    """--device cuda: no GPU visible"""
    return [c.bundle, PROMPT, "--device", "cuda"]


@case("bundle-is-a-file")
def _(c):
    """is a file"""
    (c.tmp / "afile").write_text("x")
    return _gen(c.tmp / "afile")


# -- compiler: output folders and disks
@case("force-onto-thesis", "compile")
def _(c):
    """is not an LSAQ bundle (it has no manifest.json)"""
    d = c.tmp / "thesis"
    (d / "src").mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    (d / "src" / "main.py").write_text("print(1)")
    c.after = lambda: (d / "thesis.tex").read_text() == "years of work"
    return ["build", c.model, "-o", d, "--force", "-q", "--scores", c.scores, "--profile", "paper"]


@case("force-onto-bundle-with-notes", "compile")
def _(c):
    """holds files that are not part of the bundle (notes.txt)"""
    (c.bundle / "notes.txt").write_text("mine")
    c.after = lambda: (c.bundle / "notes.txt").is_file()
    return ["build", c.model, "-o", c.bundle, "--force", "-q", "--scores", c.scores, "--profile", "paper"]


@case("force-onto-fake-manifest", "compile")
def _(c):
    """is not an LSAQ bundle (manifest.json does not say"""
    d = c.tmp / "other"
    d.mkdir()
    (d / "manifest.json").write_text('{"name": "a web app manifest"}')
    c.after = lambda: (d / "manifest.json").is_file()
    return ["build", c.model, "-o", d, "--force", "-q", "--scores", c.scores, "--profile", "paper"]


@case("no-force-onto-existing", "compile")
def _(c):
    """already exists; pass --force to replace it"""
    return ["build", c.model, "-o", c.bundle, "-q", "--scores", c.scores, "--profile", "paper"]


@case("output-parent-is-a-file", "compile")
def _(c):
    """cannot create the output folder"""
    (c.tmp / "afile").write_text("x")
    return ["build", c.model, "-o", c.tmp / "afile" / "bundle", "-q", "--scores", c.scores, "--profile", "paper"]


@case("disk-full-during-build", "compile")
def _(c):
    """cannot write the bundle (No space left on device); nothing was written"""
    import lsaq_compile.export_onnx as ex

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(c.tmp / "x.onnx"))
    c.monkeypatch.setattr(ex, "save_graph", full)
    out = c.tmp / "new-bundle"
    c.after = lambda: not out.exists() and not list(c.tmp.glob(".new-bundle.lsaq-tmp-*"))
    return ["build", c.model, "-o", out, "-q", "--scores", c.scores, "--profile", "paper"]


@case("read-only-output", "compile")
def _(c):
    """cannot write there (Permission denied)"""
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if ".lsaq-tmp-" in self.name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)
    c.monkeypatch.setattr(Path, "mkdir", denied)
    return ["build", c.model, "-o", c.tmp / "ro" / "b", "-q", "--scores", c.scores, "--profile", "paper"]


@case("chat-template-file-invalid", "compile")
def _(c):
    """not a valid Jinja chat template"""
    (c.tmp / "t.jinja").write_text("{% for %}")
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.scores, "--profile", "paper",
            "--chat-template", c.tmp / "t.jinja"]


@case("calibration-file-missing", "compile")
def _(c):
    """calibration file not found"""
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.scores, "--profile", "paper",
            "--calibration", c.tmp / "none.txt"]


@case("scores-not-json", "compile")
def _(c):
    """not a scores.json written by `lsaq-compile score`"""
    (c.tmp / "s.json").write_text("not json")
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.tmp / "s.json"]


@case("scores-wrong-types", "compile")
def _(c):
    """importance must be a non-empty list of finite numbers"""
    s = json.loads(Path(c.scores).read_text())
    s["importance"] = ["high"] * len(s["importance"])
    (c.tmp / "s.json").write_text(json.dumps(s))
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.tmp / "s.json"]


@case("scores-missing", "compile")
def _(c):
    """scores file not found"""
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.tmp / "none.json"]


@case("proxy-scores-for-the-bytes-ladder", "compile")
def _(c):
    """build.ladder 'bytes' allocates by measured sensitivity, but the scores are jaccard"""
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.scores]


@case("profile-wrong-type", "compile")
def _(c):
    """[build] max_context must be an integer, not 'big'"""
    (c.tmp / "p.toml").write_text('[build]\nmax_context = "big"\n')
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.scores, "--profile", c.tmp / "p.toml"]


@case("profile-unknown-key", "compile")
def _(c):
    """unknown key(s) in [deployment]: contxt_length"""
    (c.tmp / "p.toml").write_text("[deployment]\ncontxt_length = 4096\n")
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.scores, "--profile", c.tmp / "p.toml"]


@case("profile-not-toml", "compile")
def _(c):
    """not valid TOML"""
    (c.tmp / "p.toml").write_text("[build\n")
    return ["build", c.model, "-o", c.tmp / "o", "-q", "--scores", c.scores, "--profile", c.tmp / "p.toml"]


def _model_copy(c) -> Path:
    d = c.tmp / "model"
    shutil.copytree(c.model, d)
    return d


@case("config-missing-keys", "compile")
def _(c):
    """config.json: missing num_hidden_layers"""
    d = _model_copy(c)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (d / "config.json").write_text(json.dumps(cfg))
    return ["score", d, "-o", c.tmp / "s.json", "-q"]


@case("config-not-utf8", "compile")
def _(c):
    """config.json: not UTF-8 text"""
    d = _model_copy(c)
    (d / "config.json").write_bytes(b"\xff\xfe{}")
    return ["score", d, "-o", c.tmp / "s.json", "-q"]


@case("config-wrong-type", "compile")
def _(c):
    """config.json: hidden_size must be a positive integer, not '64'"""
    d = _model_copy(c)
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (d / "config.json").write_text(json.dumps(cfg))
    return ["score", d, "-o", c.tmp / "s.json", "-q"]


@case("pickle-checkpoint", "compile")
def _(c):
    """pickle checkpoints are never loaded"""
    (c.tmp / "model.bin").write_bytes(b"\x80\x04not really")
    return ["score", c.tmp / "model.bin"]


@case("score-output-folder-missing", "compile")
def _(c):
    """no such folder for -o"""
    return ["score", c.model, "-o", c.tmp / "nowhere" / "s.json"]


@case("study-onto-thesis", "compile")
def _(c):
    """is not an LSAQ bundle (it has no manifest.json)"""
    d = c.tmp / "bundles" / "zscore"
    d.mkdir(parents=True)
    (d / "chapter1.tex").write_text("irreplaceable")
    (c.tmp / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    c.after = lambda: (d / "chapter1.tex").read_text() == "irreplaceable"
    return ["study", c.model, "--metrics", "zscore", "--text", c.tmp / "text.txt", "--windows", "1",
            "--eval-seq-len", "64", "--samples", "2", "--seq-len", "32", "--reference-windows", "0",
            "-o", c.tmp / "results", "--bundles", c.tmp / "bundles"]


@case("old-onnxruntime")
def _(c):
    """onnxruntime 1.22.1 is too old: LSAQ bundles need 1.23 or newer"""
    import onnxruntime

    c.monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    import lsaq_runtime.session as session
    c.monkeypatch.setattr(session, "check_onnxruntime_version",
                          lambda v="1.22.1", f=session.check_onnxruntime_version: f(v))
    return _gen(c.bundle)


@case("eval-text-missing", "compile")
def _(c):
    """text file not found"""
    return ["eval", c.bundle, "--text", c.tmp / "none.txt", "--variants", "int8"]


@case("inspect-half-written", "compile")
def _(c):
    """manifest.json: missing"""
    d = c.tmp / ".b.lsaq-tmp-123"
    shutil.copytree(c.bundle, d)
    (d / "manifest.json").unlink()
    return ["inspect", d]


# ------------------------------------------------------------------------------- the test
class Ctx:
    pass


@pytest.fixture(scope="module")
def tiny_scores(tiny_llama_dir, tmp_path_factory) -> Path:
    from lsaq_compile.importance import Scores, rank

    L = 4
    imp = [0.4, 0.1, 0.3, 0.2]
    s = Scores(metric="jaccard", params={"k": 10}, calibration=None,
               model={"name": "tiny", "num_layers": L}, importance=imp, order=rank(imp))
    p = tmp_path_factory.mktemp("scores") / "scores.json"
    p.write_text(json.dumps(s.to_json()))
    return p


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("which, setup, code, expected", CASES)
def test_bad_input(which, setup, code, expected, tiny_bundle, tiny_llama_dir, tiny_scores, tmp_path,
                   capsys, monkeypatch):
    import lsaq_runtime.chat_template as ct

    monkeypatch.setattr(ct, "TIMEOUT_S", 1.0)
    c = Ctx()
    c.tmp, c.model, c.scores, c.monkeypatch, c.after = tmp_path, tiny_llama_dir, tiny_scores, monkeypatch, None
    c.bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, c.bundle)
    args = setup(c)
    got, out, err = run_cli(capsys, which, args)
    assert "Traceback" not in out + err, err
    assert got == code, (got, err)
    # Progress lines may come first; the message is one line, and the first one that says error.
    errors = [line for line in err.splitlines() if line.startswith(("lsaq-run: error:", "error:"))]
    first = errors[0] if errors else (err.strip().splitlines() or [""])[-1]
    assert len(errors) <= 1, err
    assert expected in first, f"expected {expected!r} in the message, got:\n{err}"
    assert "\x1b" not in err
    if c.after is not None:
        assert c.after(), "the case's postcondition failed (data lost or leftovers)"


def test_escapes_in_manifest_strings_do_not_reach_the_terminal(tiny_bundle, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    m = manifest(b)
    m["model"]["name"] = "evil\x1b]0;pwned\x07\x1b[2J\u202e"
    m["created_by"] = "\x1b[31mred"
    save(b, m)
    code, out, err = run_cli(capsys, "run", ["inspect", b])
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "evil\\x1b]0;pwned\\x07" in out
    code, out, err = run_cli(capsys, "compile", ["inspect", b])
    assert code == 0 and "\x1b" not in out and "evil\\x1b" in out
