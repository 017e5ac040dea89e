"""Bad and hostile inputs, each through the command a user runs: one clear line, exit code 2.

Every case sets up one problem (in a manifest, a graph, the weights, the tokenizer, the chat
template, the model inputs, the output folder, the disk), runs `lsaq-run` or `lsaq-compile`
in-process, and asserts the exit code, the first line of stderr, and that no traceback was
printed. The data-loss and silent-corruption cases of issue 8 are among them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import onnx
import pytest

from lsaq_runtime.cli import main as run_main
from factories.bundles import backtracking_tokenizer, manifest, rehash, save
from factories.cli import run_cli

PROMPT = "the quick brown fox"


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


# ------------------------------------------------------------------------------- issue 24
def _scrambled(data: bytes, start: int) -> bytes:
    """`data` with 64 bytes flipped from `start` on (inside a weight file's data section)."""
    out = bytearray(data)
    for i in range(start, start + 64):
        out[i] ^= 0xFF
    return bytes(out)


def _data_start(p: Path) -> int:
    return 8 + int.from_bytes(p.read_bytes()[:8], "little")


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# -- 1: every byte ONNX Runtime reads is a byte the runtime hashed
def _graph_in_subfolder(c) -> None:
    """The issue's case: fp16's CPU graph moved to sub/, beside an unlisted, scrambled
    sub/weights/float.safetensors that ONNX Runtime would read (it resolves from the graph)."""
    b = c.bundle
    (b / "sub" / "weights").mkdir(parents=True)
    shutil.move(b / "fp16.cpu.onnx", b / "sub" / "fp16.cpu.onnx")
    src = b / "weights" / "float.safetensors"
    (b / "sub" / "weights" / "float.safetensors").write_bytes(
        _scrambled(src.read_bytes(), _data_start(src) + 16))
    m = manifest(b)
    for f in m["files"]:
        if f["path"] == "fp16.cpu.onnx":
            f["path"] = "sub/fp16.cpu.onnx"
    prov = variant(m, "fp16")["providers"]["cpu"]
    prov["graph"] = "sub/fp16.cpu.onnx"
    prov["files"] = ["sub/fp16.cpu.onnx" if f == "fp16.cpu.onnx" else f for f in prov["files"]]
    save(b, m)
    before = _snapshot(b)
    c.after = lambda: _snapshot(b) == before      # nothing touched, nothing deleted


@case("graph-in-subfolder-reads-unhashed-weights")
def _(c):
    """its graph 'sub/fp16.cpu.onnx' is in a subfolder"""
    _graph_in_subfolder(c)
    return _gen(c.bundle)


@case("verify-graph-in-subfolder")
def _(c):
    """its graph 'sub/fp16.cpu.onnx' is in a subfolder"""
    _graph_in_subfolder(c)
    return ["verify", c.bundle]


# -- 2: a stamp records only what was hashed
@case("file-swapped-while-hashed")
def _(c):
    """int8.safetensors: sha256 mismatch"""
    import lsaq_runtime.integrity as integrity

    target = c.bundle / "weights" / "int8.safetensors"
    bad = _scrambled(target.read_bytes(), _data_start(target) + 16)
    staged = c.tmp / "staged.safetensors"
    staged.write_bytes(bad)
    real_fstat, swapped = os.fstat, []

    def fstat(fd):
        st = real_fstat(fd)
        # the first look at the open descriptor of int8.safetensors: its hash has begun; a
        # scrambled copy is renamed over the path now, as the 0.4 s window allows
        if not swapped and os.readlink(f"/proc/self/fd/{fd}") == str(target):
            swapped.append(True)
            os.replace(staged, target)
        return st
    c.monkeypatch.setattr(integrity.os, "fstat", fstat)
    args = _gen(c.bundle, "--variant", "int8")
    # No stamp was written for the old bytes: the next launch hashes again and refuses again
    # (before: "0 MiB hashed" and empty text for good), and the scrambled file is still there.
    c.after = lambda: swapped and run_main([str(a) for a in args]) == 2 and \
        target.read_bytes() == bad
    return args


# -- 3: --force replaces only a bundle that passes the full check
@case("force-onto-lookalike-manifest", "compile")
def _(c):
    """does not pass the bundle check, so it may hold someone's files"""
    d = c.tmp / "thesis"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work")
    (d / "manifest.json").write_text('{"format":"lsaq-bundle","files":[{"path":"thesis.tex"}]}')
    before = _snapshot(d)
    c.after = lambda: _snapshot(d) == before
    return ["build", c.model, "-o", d, "--force", "-q", "--scores", c.scores, "--profile", "paper"]


@case("force-onto-damaged-bundle", "compile")
def _(c):
    """float.safetensors: sha256 mismatch"""
    p = c.bundle / "weights" / "float.safetensors"
    p.write_bytes(_scrambled(p.read_bytes(), _data_start(p) + 16))
    before = _snapshot(c.bundle)
    c.after = lambda: _snapshot(c.bundle) == before
    return ["build", c.model, "-o", c.bundle, "--force", "-q", "--scores", c.scores, "--profile", "paper"]


# -- 4: the compiler refuses non-finite and out-of-range numbers before building
def _config(c, **changes) -> Path:
    d = _model_copy(c)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))   # json writes NaN and Infinity as such
    return d


def _build_nothing(c, model) -> list:
    out = c.tmp / "out"
    c.after = lambda: not out.exists() and not list(c.tmp.glob(".out.lsaq-*"))
    return ["build", model, "-o", out, "-q", "--scores", c.scores, "--profile", "paper"]


@case("config-rms-eps-nan", "compile")
def _(c):
    """rms_norm_eps (GGUF: attention.layer_norm_rms_epsilon) is nan; it must be a finite number between 0 and 1"""
    return _build_nothing(c, _config(c, rms_norm_eps=float("nan")))


@case("config-rms-eps-negative", "compile")
def _(c):
    """rms_norm_eps (GGUF: attention.layer_norm_rms_epsilon) is -1; it must be a finite number"""
    return _build_nothing(c, _config(c, rms_norm_eps=-1))


@case("config-rope-theta-infinite", "compile")
def _(c):
    """rope_theta (GGUF: rope.freq_base) is inf; it must be a finite number above 1"""
    return _build_nothing(c, _config(c, rope_parameters={"rope_theta": float("inf"),
                                                         "rope_type": "default"}))


@case("config-huge-layer-count", "compile")
def _(c):
    """num_hidden_layers is 1,000,000,000, more than a bundle can hold (4,096)"""
    return _build_nothing(c, _config(c, num_hidden_layers=10**9))


@case("weights-nan", "compile")
def _(c):
    """tensor model.layers.1.mlp.down_proj.weight holds 1 NaN or infinite values"""
    from safetensors.numpy import load_file, save_file

    d = _model_copy(c)
    p = next(d.glob("*.safetensors"))
    tensors = load_file(str(p))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(p), metadata={"format": "pt"})
    return _build_nothing(c, d)


def _gguf_with(c, key: bytes, value: bytes) -> Path:
    """A copy of the default SmolLM2 GGUF with one metadata value replaced in place (the value
    follows its key and a 4-byte type)."""
    from lsaq_compile.model_source import default_model_path

    data = bytearray(default_model_path().read_bytes())
    i = data.find(key, 0, 1 << 20) + len(key) + 4
    data[i:i + len(value)] = value
    p = c.tmp / "model.gguf"
    p.write_bytes(bytes(data))
    return p


@case("gguf-rope-freq-base-nan", "compile")
def _(c):
    """rope_theta (GGUF: rope.freq_base) is nan"""
    import struct

    return _build_nothing(c, _gguf_with(c, b"llama.rope.freq_base", struct.pack("<f", float("nan"))))


@case("gguf-rms-epsilon-infinite", "compile")
def _(c):
    """rms_norm_eps (GGUF: attention.layer_norm_rms_epsilon) is inf"""
    import struct

    return _build_nothing(c, _gguf_with(c, b"llama.attention.layer_norm_rms_epsilon",
                                        struct.pack("<f", float("inf"))))


@case("gguf-huge-layer-count", "compile")
def _(c):
    """num_hidden_layers is 4,000,000,000, more than a bundle can hold (4,096)"""
    import struct

    return _build_nothing(c, _gguf_with(c, b"llama.block_count", struct.pack("<I", 4_000_000_000)))


# -- 5: resident_bytes cannot understate what the graph holds
def _understated(c) -> None:
    m = manifest(c.bundle)
    variant(m, "fp16")["providers"]["cpu"]["resident_bytes"] = 0
    m["deployment"]["safety_margin"] = {"fraction": 0, "min_bytes": 0}
    m["deployment"]["runtime_overhead_bytes"] = {"cpu": 0, "cuda": 0}
    save(c.bundle, m)


@case("resident-bytes-understated")
def _(c):
    """resident_bytes 0 is less than the"""
    _understated(c)
    return _gen(c.bundle)


@case("verify-resident-bytes-understated")
def _(c):
    """1 problem(s)"""
    _understated(c)
    return ["verify", c.bundle]


# -- 6: integers are integers
@case("integer-written-as-float")
def _(c):
    """invalid at model/num_layers: 4.0 is not of type 'integer'"""
    text = (c.bundle / "manifest.json").read_text()
    (c.bundle / "manifest.json").write_text(text.replace('"num_layers": 4', '"num_layers": 4.0', 1))
    return _gen(c.bundle)


@case("verify-integer-written-as-float")
def _(c):
    """invalid at model/num_layers: 4.0 is not of type 'integer'"""
    text = (c.bundle / "manifest.json").read_text()
    (c.bundle / "manifest.json").write_text(text.replace('"num_layers": 4', '"num_layers": 4.0', 1))
    return ["verify", c.bundle]


# -- 7: an empty API key is refused, not read as "no authentication"
@case("serve-empty-api-key")
def _(c):
    """--api-key (or LSAQ_API_KEY) is empty, which would turn authentication off"""
    return ["serve", c.bundle, "--port", "0", "--api-key", ""]


@case("serve-empty-api-key-env")
def _(c):
    """--api-key (or LSAQ_API_KEY) is empty, which would turn authentication off"""
    c.monkeypatch.setenv("LSAQ_API_KEY", "")
    return ["serve", c.bundle, "--port", "0"]


# -- 10: the command line's twins of the server's 400s
@case("seed-negative")
def _(c):
    """seed must be an integer from 0 to 2**64-1 (got -1)"""
    return _gen(c.bundle, "--seed", "-1", "-t", "0.7")


@case("temperature-subnormal")
def _(c):
    """temperature 1e-310 is too small to sample with"""
    return _gen(c.bundle, "-t", "1e-310")


@case("temperature-nan")
def _(c):
    """temperature must be a number >= 0 (got nan)"""
    return _gen(c.bundle, "-t", "nan")


@case("prompt-not-utf8")
def _(c):
    """PROMPT is not UTF-8 text (byte 0xe9 at character 3)"""
    return [c.bundle, os.fsdecode(b"caf\xe9"), "-n", "2", "--device", "cpu"]


@case("stdin-not-utf8")
def _(c):
    """stdin is not UTF-8 text (byte 0xe9 at offset 3)"""
    import io
    import sys

    c.monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait\n")))
    return [c.bundle, "-", "-n", "2", "--device", "cpu"]


@case("budget-1e400")
def _(c):
    """not a size: '1e400'"""
    return _gen(c.bundle, "--memory-budget", "1e400")


@case("budget-overflows-a-float")
def _(c):
    """is more than any device has (over 1 EiB)"""
    return _gen(c.bundle, "--memory-budget", "1" + "0" * 400)


@case("serve-binary-budget-file")
def _(c):
    """the memory budget file is not a short text file"""
    (c.tmp / "budget").write_bytes(b"\x7fELF\x00\xff\xfe" * 10)
    return ["serve", c.bundle, "--port", "0", "--memory-budget-file", c.tmp / "budget"]


# -- 13: bounded hashing: headers and sizes first, one spelling per file
@case("variant-file-64gib-sparse")
def _(c):
    """refused without being hashed"""
    import struct
    import time

    p = c.bundle / "weights" / "int8.safetensors"
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    # One more tensor, 64 GiB of zeros that no graph reads: the header keeps its length (the
    # writer leaves room), so every offset the graphs hold stays right.
    header["padding"] = {"dtype": "U8", "shape": [64 << 30], "data_offsets": [end, end + (64 << 30)]}
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", n) + text.ljust(n, b" "))
        f.truncate(8 + n + end + (64 << 30))   # sparse: no disk used
    m = manifest(c.bundle)
    for f in m["files"]:
        if f["path"] == "weights/int8.safetensors":
            f["bytes"] = p.stat().st_size
    save(c.bundle, m)
    t0 = time.monotonic()
    c.after = lambda: time.monotonic() - t0 < 30   # hashing 64 GiB would take a minute or more
    return _gen(c.bundle, "--variant", "int8")


@case("safetensors-trailing-bytes")
def _(c):
    """data bytes belong to no tensor its header names"""
    p = c.bundle / "weights" / "int8.safetensors"
    p.write_bytes(p.read_bytes() + b"\0" * 4096)
    rehash(c.bundle, "weights/int8.safetensors")
    return _gen(c.bundle, "--variant", "int8")


def _spellings(c) -> None:
    m = manifest(c.bundle)
    e = next(f for f in m["files"] if f["path"] == "weights/float.safetensors")
    # 2,000 spellings of weights/float.safetensors ('./' before it, '/' doubled in it)
    m["files"] += [{**e, "path": "./" * (i % 45) + "weights" + "/" * (i // 45 + 1) +
                    "float.safetensors"} for i in range(1, 2001)]
    save(c.bundle, m)


@case("two-thousand-spellings-of-one-file")
def _(c):
    """which is not written in normal form"""
    _spellings(c)
    return _gen(c.bundle)


@case("verify-two-thousand-spellings")
def _(c):
    """which is not written in normal form"""
    import time

    _spellings(c)
    t0 = time.monotonic()
    c.after = lambda: time.monotonic() - t0 < 30
    return ["verify", c.bundle]


# -- 14: tokenizers: bounded size, a crash in Rust ends as one line
@case("tokenizer-3gib-sparse")
def _(c):
    """tokenizer/tokenizer.json is 3,221,225,472 bytes, more than the 128 MiB a tokenizer may have"""
    p = c.bundle / "tokenizer" / "tokenizer.json"
    with open(p, "r+b") as f:
        f.truncate(3 << 30)
    m = manifest(c.bundle)
    for f in m["files"]:
        if f["path"] == "tokenizer/tokenizer.json":
            f["bytes"] = 3 << 30
    save(c.bundle, m)
    return _gen(c.bundle)


@case("tokenizer-regex-panics")
def _(c):
    """the bundle's tokenizer failed on the prompt: the tokenizer library crashed on it"""
    backtracking_tokenizer(c.bundle)
    return [c.bundle, "a" * 40 + "b", "-n", "2", "--device", "cpu"]


# -- 15: --threads is bounded by the CPUs this process may use
@case("threads-5000")
def _(c):
    """--threads 5000: this process may use"""
    return _gen(c.bundle, "--threads", "5000")


@case("serve-threads-5000")
def _(c):
    """--threads 5000: this process may use"""
    return ["serve", c.bundle, "--port", "0", "--threads", "5000"]


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


# ------------------------------------------------------------------------------- issue 24: --force swaps
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [p for p in (str(REPO / "runtime"), str(REPO), os.environ.get("PYTHONPATH")) if p])}


def _hidden(folder: Path, name: str) -> dict[str, Path]:
    """The folders and journal a build of `folder/name` keeps beside it, by kind."""
    out = {}
    for p in folder.iterdir():
        for kind in ("lsaq-old-", "lsaq-tmp-", "lsaq-swap"):
            if p.name.startswith(f".{name}.{kind}"):
                out[kind] = p
    return out


def test_force_swap_survives_a_crash_between_the_renames(tiny_bundle, tiny_llama_dir, tiny_scores,
                                                         tmp_path, capsys):
    """A build killed after moving the old bundle aside and before putting the new one in place
    (issue 24: the next build deleted the finished new bundle, the old one stayed hidden)."""
    import subprocess
    import sys

    from lsaq_runtime.verify import verify_bundle

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    old = _snapshot(out)
    args = ["build", str(tiny_llama_dir), "-o", str(out), "--force", "-q", "--scores",
            str(tiny_scores), "--profile", "paper"]
    crash = ("import os, pathlib\n"
             "real = pathlib.Path.rename\n"
             "def rename(self, target):\n"
             "    if '.lsaq-tmp-' in self.name and pathlib.Path(target).name == 'b':\n"
             "        os._exit(137)   # killed between the two renames\n"
             "    return real(self, target)\n"
             "pathlib.Path.rename = rename\n"
             "from lsaq_compile.cli import main\n"
             f"main({args!r})\n")
    # its own TMPDIR: a process ended by os._exit cannot remove its temporaries
    r = subprocess.run([sys.executable, "-c", crash], env={**ENV, "TMPDIR": str(tmp_path)},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 137, r.stderr
    left = _hidden(tmp_path, "b")
    assert not out.exists() and set(left) == {"lsaq-old-", "lsaq-tmp-", "lsaq-swap"}, left
    assert _snapshot(left["lsaq-old-"]) == old                  # the old bundle, byte for byte
    new = _snapshot(left["lsaq-tmp-"])
    assert verify_bundle(left["lsaq-tmp-"]) == []               # and a finished new one

    # a launch says what happened, in one line
    code, _, err = run_cli(capsys, "run", [out, PROMPT, "--device", "cpu"])
    assert code == 2 and "interrupted while swapping folders" in err and err.count("\n") == 1

    # the next build finishes the swap before anything else (it fails later, on purpose)
    code, _, err = run_cli(capsys, "compile", [*args[:-4], "--scores", tmp_path / "none.json",
                                               "--profile", "paper"])
    assert code == 2 and "scores file not found" in err, err
    assert _snapshot(out) == new and verify_bundle(out) == []
    assert _hidden(tmp_path, "b") == {}


def test_an_interrupted_swap_without_a_finished_bundle_puts_the_old_one_back(tiny_bundle, tmp_path):
    from lsaq_compile.folders import _recover_swap

    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, tmp_path / ".b.lsaq-old-999999")
    old = _snapshot(tmp_path / ".b.lsaq-old-999999")
    (tmp_path / ".b.lsaq-tmp-999999").mkdir()      # unfinished: no manifest
    (tmp_path / ".b.lsaq-swap").write_text(json.dumps(
        {"target": "b", "old": ".b.lsaq-old-999999", "new": ".b.lsaq-tmp-999999", "pid": 999999}))
    _recover_swap(out)
    assert _snapshot(out) == old and not (tmp_path / ".b.lsaq-swap").exists()


def test_build_into_dot_from_inside_a_bundle(tiny_bundle, tiny_llama_dir, tiny_scores, tmp_path,
                                             capsys, monkeypatch):
    """`-o .` names the folder one is in: the temporary folder goes beside it, not inside it
    (issue 24: it built fully, then refused naming its own temporary files)."""
    from lsaq_runtime.verify import verify_bundle

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    monkeypatch.chdir(b)
    code, _, err = run_cli(capsys, "compile", ["build", tiny_llama_dir, "-o", ".", "--force", "-q",
                                               "--scores", tiny_scores, "--profile", "paper"])
    monkeypatch.chdir(tmp_path)
    assert code == 0, err
    assert verify_bundle(b) == [] and _hidden(tmp_path, "b") == {}
