"""Evaluation on the shipped graphs: perplexity and multiple choice, cross-checked."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lsaq_compile import evaluate as ev
from lsaq_compile.bundle import read_manifest
from lsaq_compile.errors import LsaqError
from factories.data import WIKITEXT

EASY = Path(__file__).parent / "data" / "easy_choices.jsonl"
CLI = [sys.executable, "-m", "lsaq_compile.cli"]


def _text(tmp_path):
    p = tmp_path / "text.txt"
    src = WIKITEXT.read_text(encoding="utf-8")[:40_000] if WIKITEXT.is_file() else \
        "the quick brown fox jumps over the lazy dog. " * 800
    p.write_text(src, encoding="utf-8")
    return p


def test_onnx_perplexity_matches_torch_reference(tiny_bundle, tiny_llama_dir, tmp_path):
    m = read_manifest(tiny_bundle)
    tw = ev.text_windows(_text(tmp_path), tiny_bundle, 128, 3)
    for name in ("fp16", "int8", m["variants"][len(m["variants"]) // 2]["name"], "int4"):
        v = next(x for x in m["variants"] if x["name"] == name)
        a = ev.perplexity(ev.onnx_logits_fn(tiny_bundle, m, name), tw)["perplexity"]
        b = ev.perplexity(ev.torch_logits_fn(tiny_llama_dir, v["precisions"]), tw)["perplexity"]
        assert abs(a - b) / b < 1e-3, (name, a, b)


def test_perplexity_by_hand():
    """Uniform logits over V give perplexity V; a model that is always right gives 1."""
    V = 50
    tw = ev.TextWindows("x", "0", 8, np.arange(16, dtype=np.int64).reshape(2, 8) % V, 16)
    assert math.isclose(ev.perplexity(lambda ids: np.zeros((len(ids), V), np.float32), tw)["perplexity"], V)

    def oracle(ids):
        out = np.full((len(ids), V), -1e4, np.float32)
        out[np.arange(len(ids) - 1), ids[1:]] = 0
        return out
    assert math.isclose(ev.perplexity(oracle, tw)["perplexity"], 1.0, rel_tol=1e-9)


def test_log_probabilities_by_row_chunks_are_the_whole_arrays_bit_for_bit():
    """Perplexity, likelihoods and build-time quality read log_softmax by LSM_ROWS rows (a
    whole window's float64 temporaries cost seconds of first touch here): same values, any
    row count, a last chunk short or whole, targets one row shorter than the logits."""
    rng = np.random.default_rng(0)
    for rows in (1, 31, 32, 33, 100):
        z = (rng.standard_normal((rows + 1, 301)) * 8).astype(np.float32)
        t = rng.integers(0, 301, rows)
        whole = ev._log_softmax(z)
        chunks = list(ev.log_softmax_rows(z))
        assert [a for a, _ in chunks] == list(range(0, rows + 1, ev.LSM_ROWS))
        assert np.array_equal(np.concatenate([c for _, c in chunks]), whole)
        assert np.array_equal(ev.token_logprobs(z, t), whole[np.arange(rows), t])
    with pytest.raises(ValueError, match="3 targets for 2 rows"):
        ev.token_logprobs(z[:2], t[:3])
    # a window's NLL is the one the whole array gives, to the last bit
    w = rng.integers(0, 301, 70)
    z = (rng.standard_normal((70, 301)) * 8).astype(np.float32)
    lp = ev._log_softmax(z[:-1])
    assert ev.window_nll(lambda ids: z, w) == (float(-lp[np.arange(69), w[1:]].sum()), 69)


def test_text_window_errors(tiny_bundle, tmp_path):
    tok = tiny_bundle
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(LsaqError, match="windows"):
        ev.text_windows(short, tok, 128, 4)
    with pytest.raises(LsaqError, match="not found"):
        ev.text_windows(tmp_path / "missing.txt", tok)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(LsaqError, match="UTF-8"):
        ev.text_windows(bad, tok)


def test_choice_task_file_errors(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"context": "a", "choices": ["b"], "label": 3}\n')
    with pytest.raises(LsaqError, match="out of range"):
        ev.load_choice_tasks(p)
    p.write_text('{"context": "a"}\n')
    with pytest.raises(LsaqError, match=r"t.jsonl:1"):
        ev.load_choice_tasks(p)


def test_eval_cli_records_results_in_the_bundle(tiny_bundle, tmp_path):
    import shutil

    import hashlib

    from lsaq_runtime.bundle_folder import replace_refusal
    from lsaq_runtime.verify import verify_bundle

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    before = (b / "manifest.json").read_bytes()
    r = subprocess.run(CLI + ["eval", str(b), "--text", str(_text(tmp_path)), "--seq-len", "64",
                              "--windows", "2", "--variants", "fp16,int4", "--tasks", str(EASY), "-q"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = read_manifest(b)  # the runtime's reader still accepts the bundle
    # the results lie beside the manifest, which is byte for byte what the build wrote
    after = (b / "manifest.json").read_bytes()
    assert after == before
    assert hashlib.sha256(after).hexdigest() == hashlib.sha256(before).hexdigest()
    assert "evaluations" not in m and (b / "evaluations.json").is_file()
    assert verify_bundle(b) == []          # an unlisted evaluations.json is no problem
    assert replace_refusal(b) is None      # and --force may still replace the bundle
    recorded = ev.read_evaluations(b)
    kinds = {(e["kind"], e["variant"]) for e in recorded}
    assert kinds == {(k, v) for k in ("perplexity", "multiple_choice") for v in ("fp16", "int4")}
    assert all(e["value"] > 0 for e in recorded if e["kind"] == "perplexity")
    r = subprocess.run(CLI + ["inspect", str(b)], capture_output=True, text=True)
    assert r.returncode == 0 and "recorded evaluations" in r.stdout
    assert r.stdout.count("multiple_choice") == 2, r.stdout
    r = subprocess.run(CLI + ["eval", str(b), "--variants", "nope", "--text", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown variant" in r.stderr


@pytest.mark.slow
def test_multiple_choice_on_real_model(smollm_bundle):
    """An unambiguous task: SmolLM2 gets every item; each log-likelihood equals a direct torch
    computation on the same weights (context and continuation tokenized by hand)."""
    import torch

    from lsaq_compile.model_source import open_model
    from lsaq_compile.reference import reference_model
    from lsaq_compile.quantize import schemes_for
    from tokenizers import Tokenizer

    m = read_manifest(smollm_bundle)
    tk = Tokenizer.from_file(str(smollm_bundle / "tokenizer" / "tokenizer.json"))
    encode = lambda s: tk.encode(s, add_special_tokens=False).ids
    items = ev.load_choice_tasks(EASY)
    res = ev.multiple_choice(ev.onnx_logits_fn(smollm_bundle, m, "fp16"), encode, items)
    assert res["acc"] == 1.0, res

    ref = reference_model(open_model(None), ["fp16"] * 30, schemes_for("channel")).eval()
    for it, d in zip(items, res["details"]):
        for (context, choice), ll in zip(it.requests, d["loglikelihoods"]):
            ctx, cont = encode(context), encode(choice)
            assert encode(context + choice) == ctx + cont  # the split is unambiguous here
            ids = torch.tensor(ctx + cont)[None]
            with torch.no_grad():
                lp = torch.log_softmax(ref(ids).logits[0].double(), -1)
            direct = sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert abs(ll - direct) < 1e-3 * max(1.0, abs(direct)), (context, choice, ll, direct)


def test_lm_eval_adapter_with_a_local_task(tiny_bundle, tmp_path, monkeypatch):
    """lm-evaluation-harness drives the adapter on a local JSONL task; its accuracy and
    log-likelihoods equal our own multiple-choice scoring of the same variant."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lsaq_compile.lm_eval_adapter import LsaqLM

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local.yaml").write_text(f"""
task: lsaq_local_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {EASY}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    lm = LsaqLM(bundle=str(tiny_bundle), variant="int8", device="cpu")
    out = simple_evaluate(model=lm, tasks=["lsaq_local_choices"],
                          task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    acc = out["results"]["lsaq_local_choices"]["acc,none"]

    m = read_manifest(tiny_bundle)
    ours = ev.multiple_choice(ev.onnx_logits_fn(tiny_bundle, m, "int8"), lm._encode, ev.load_choice_tasks(EASY))
    assert acc == pytest.approx(ours["acc"])
    for it, d in zip(ev.load_choice_tasks(EASY), ours["details"]):
        for (context, c), ll in zip(it.requests, d["loglikelihoods"]):
            assert lm._score(context, c)[0] == pytest.approx(ll, abs=1e-4)


def test_evaluations_of_old_bundles_are_read_from_their_manifest(tmp_path):
    """Bundles from before evaluations.json kept their results in the manifest: still read;
    a file recorded for another manifest (the folder was rebuilt) is not this bundle's."""
    old = [{"kind": "perplexity", "variant": "fp16", "provider": "cpu", "value": 9.0}]
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "lsaq-bundle",
                                                        "evaluations": old}))
    assert ev.read_evaluations(tmp_path) == old
    new = [{"kind": "perplexity", "variant": "int4", "provider": "cpu", "value": 10.0}]
    ev.record_evaluations(tmp_path, new)
    assert json.loads((tmp_path / "manifest.json").read_text())["evaluations"] == old
    assert ev.read_evaluations(tmp_path) == old + new
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "lsaq-bundle"}))
    assert ev.read_evaluations(tmp_path) == []
    (tmp_path / "evaluations.json").write_text("[")
    with pytest.raises(LsaqError, match="evaluations.json: cannot be read"):
        ev.read_evaluations(tmp_path)
