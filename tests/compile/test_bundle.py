"""The bundle: every graph valid and loadable, atomic writes, integrity, the real model's build."""

import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lsaq_compile.bundle import read_manifest
from lsaq_compile.errors import LsaqError
from lsaq_runtime.errors import LsaqRuntimeError
from factories.data import WIKITEXT

CLI = [sys.executable, "-m", "lsaq_compile.cli"]


def test_every_graph_checks_and_loads(tiny_bundle):
    m = read_manifest(tiny_bundle)
    graphs = [g["graph"] for v in m["variants"] for g in v["providers"].values()]
    assert len(graphs) == 2 * (m["model"]["num_layers"] + 2)   # full ladder, cpu + cuda graphs
    for g in graphs:
        onnx.checker.check_model(str(tiny_bundle / g), full_check=True)
        ort.InferenceSession(str(tiny_bundle / g), providers=["CPUExecutionProvider"])


def test_manifest_contents(tiny_bundle):
    m = read_manifest(tiny_bundle)
    L = m["model"]["num_layers"]
    names = [v["name"] for v in m["variants"]]
    assert names[:2] == ["fp16", "int8"] and names[-1] == "int4"
    order = m["scores"]["order"]
    for v in m["variants"][1:]:
        n4 = v["layer_counts"]["int4"]
        assert {i for i, p in enumerate(v["precisions"]) if p == "int4"} == set(order[:n4])
    sizes = [v["weight_bytes"] for v in m["variants"]]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    bits = [v["avg_bits"] for v in m["variants"]]
    assert all(a > b for a, b in zip(bits, bits[1:]))
    listed = {f["path"] for f in m["files"]}
    on_disk = {p.relative_to(tiny_bundle).as_posix() for p in tiny_bundle.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert listed == on_disk
    assert (tiny_bundle / "tokenizer" / "tokenizer.json").is_file()
    assert m["scores"]["metric"] == "jaccard" and len(m["scores"]["importance"]) == L


def test_weight_bytes_are_the_referenced_tensors(tiny_bundle):
    """weight_bytes equals the summed lengths of the external-data tensors in the graph."""
    m = read_manifest(tiny_bundle)
    for v in (m["variants"][0], m["variants"][-1]):
        for prov, g in v["providers"].items():
            model = onnx.load(str(tiny_bundle / g["graph"]), load_external_data=False)
            total = 0
            for t in model.graph.initializer:
                info = {e.key: e.value for e in t.external_data}
                if info:
                    assert not info["location"].startswith("..")
                    total += int(info["length"])
            assert total == g["weight_bytes"], (v["name"], prov)
        assert v["weight_bytes"] == v["providers"]["cuda"]["weight_bytes"]


def test_refuses_to_overwrite_without_force(tiny_llama_dir, tiny_bundle, tmp_path):
    r = subprocess.run(CLI + ["build", str(tiny_llama_dir), "-o", str(tiny_bundle), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr


def test_killed_build_leaves_no_valid_bundle(tiny_llama_dir, tmp_path):
    out = tmp_path / "killed"
    p = subprocess.Popen(CLI + ["build", str(tiny_llama_dir), "-o", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    # Kill it hard the moment it reports writing the weight store: by then its temporary folder
    # holds the tokenizer and part of the store. Event-driven, so a fast build cannot slip past.
    seen = []
    for line in p.stderr:
        seen.append(line)
        if "quantizing:" in line:
            os.killpg(p.pid, signal.SIGKILL)
            break
    p.wait()
    assert any("quantizing:" in x for x in seen), "".join(seen)
    tmps = list(tmp_path.glob(".killed.lsaq-tmp-*"))
    assert len(tmps) == 1 and any(tmps[0].iterdir()), "the build was not killed midway"
    tmp = tmps[0]
    assert not out.exists()
    for candidate in (out, tmp):
        r = subprocess.run(CLI + ["inspect", str(candidate)], capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr
        with pytest.raises((LsaqError, LsaqRuntimeError)):
            read_manifest(candidate)
    # the next build cleans the dead build's leftovers and succeeds
    r = subprocess.run(CLI + ["build", str(tiny_llama_dir), "-o", str(out), "-q", "--profile", "paper"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not tmp.exists() and read_manifest(out)["variants"]


def test_tampered_bundle_is_rejected_naming_the_file(tiny_bundle, tmp_path):
    import shutil

    b = tmp_path / "copy"
    shutil.copytree(tiny_bundle, b)
    w = b / "weights" / "int4.safetensors"
    with open(w, "ab") as f:
        f.write(b"\0")
    with pytest.raises(LsaqRuntimeError, match="int4.safetensors"):
        read_manifest(b)


@pytest.mark.slow
def test_smollm_bundle_size_and_fp16_agreement(smollm_bundle):
    """FP16 variant vs transformers (float32) on 512 teacher-forced WikiText-2 positions; the
    whole ladder's files within 2x the FP16 variant's weight bytes (one INT8 and one INT4 copy
    of every layer with scales for both providers, and the CPU graphs' INT8 LM head: 1.90x
    measured for the default ladder)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lsaq_compile.evaluate import onnx_logits_fn, text_windows
    from lsaq_compile.model_source import open_model

    m = read_manifest(smollm_bundle)
    assert m["model"]["num_layers"] == 30 and {"fp16", "int8", "int4"} <= {v["name"] for v in m["variants"]}
    total = sum(f["bytes"] for f in m["files"])
    fp16 = next(v for v in m["variants"] if v["name"] == "fp16")["weight_bytes"]
    assert total <= 2.0 * fp16, (total, fp16)

    if not WIKITEXT.is_file():
        pytest.skip(f"{WIKITEXT} missing")
    tw = text_windows(WIKITEXT, smollm_bundle, 513, 1)
    ids = tw.windows[0]
    onnx_next = onnx_logits_fn(smollm_bundle, m, "fp16")(ids)[:-1].argmax(-1)
    src = open_model(None)
    hf = AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        ref_next = hf(torch.as_tensor(ids)[None]).logits[0, :-1].argmax(-1).numpy()
    agree = float(np.mean(onnx_next == ref_next))
    print(f"FP16 variant agrees with transformers on {agree:.4f} of 512 positions")
    assert agree >= 0.99
