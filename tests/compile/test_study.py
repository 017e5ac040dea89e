"""The comparison study end to end: report, plots, budget table, zero-shot Table I and its
statistics; `--quick` on the real model."""

import json
import math
import subprocess
import sys

import pytest

from lsaq_compile.progress import Progress
from lsaq_compile.study import MIXES, PAPER_POINTS, paired_diff, run_study, verdict
from factories.data import C4, LM_EVAL, WIKITEXT, ZEROSHOT, write_tasks


def test_study_on_tiny_model(tiny_llama_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("A held-out text about rivers, mountains and the sea. " * 400, encoding="utf-8")
    tasks = write_tasks(tmp_path / "zeroshot", n=4)
    out = run_study(tiny_llama_dir, ("jaccard", "cosine", "zscore"), text, tmp_path / "results",
                    calibration=str(C4) if C4.is_file() else None, samples=4, seq_len=32,
                    eval_seq_len=64, windows=2, reference_windows=1, progress=Progress(quiet=True),
                    tasks_dir=tasks, items=3, select_windows=2, cross_check=LM_EVAL)
    s = json.loads((out / "results.json").read_text())
    for m in ("jaccard", "cosine", "zscore"):
        assert set(s["results"][m]) == set(PAPER_POINTS)
        bits = [s["results"][m][p]["avg_bits"] for p in PAPER_POINTS]
        assert bits == sorted(bits, reverse=True)
        for p in PAPER_POINTS:
            r = s["results"][m][p]
            assert r["perplexity"] > 1 and r["reference"]["rel_diff"] < 5e-3
    # FP16, INT8 and all-INT4 are one plan under every metric: evaluated once, same number
    for p in ("fp16", "int8", "int4"):
        assert len({s["results"][m][p]["perplexity"] for m in s["metrics"]}) == 1
    chosen = [r["variant"] for r in s["budgets"]["cpu"]]
    assert chosen[0] is None and chosen[-1] == "fp16"   # budgets span "nothing fits" to FP16
    # Table I: every plan scored the same 3 questions of each task; FP16 checked through lm-eval
    for m in s["metrics"] + ["best"]:
        for p in PAPER_POINTS:
            z = s["results"][m][p]["zeroshot"]
            assert set(z) == {"piqa", "arc_easy", "arc_challenge", "boolq", "winogrande"}
            assert all(len(z[t]["correct"]) == 3 == z[t]["items"] for t in z)
            assert ("acc_norm" in z["piqa"]) and ("acc_norm" not in z["boolq"])
    if LM_EVAL:
        assert all(r["identical"] for r in s["cross_check"]["tasks"].values()), s["cross_check"]
    # "best" is, at each mix, the order with the lowest calibration perplexity
    for p in MIXES:
        assert s["results"]["best"][p]["select_nll"] == min(s["results"][m][p]["select_nll"] for m in s["metrics"])
    report = (out / "report.md").read_text()
    assert "Table III" in report and "Table IV" in report and "Table I)" in report
    assert s["verdict"]["text"] in report and "The claim (Jaccard loses less" in s["verdict"]["text"]
    # rerun: every measurement is read back from the bundles' evaluations.json, nothing recomputed
    again = run_study(tiny_llama_dir, ("jaccard", "cosine", "zscore"), text, tmp_path / "results",
                      calibration=str(C4) if C4.is_file() else None, samples=4, seq_len=32,
                      eval_seq_len=64, windows=2, reference_windows=1, progress=Progress(quiet=True),
                      tasks_dir=tasks, items=3, select_windows=2, cross_check=False)
    s2 = json.loads((again / "results.json").read_text())
    assert s2["results"] == s["results"] and s2["seconds"] < s["seconds"]
    for png in ("importance.png", "perplexity_vs_bits.png", "zeroshot_vs_bits.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake(correct_by_task):
    return {"bundle": "b", "variant": "v", "perplexity": 1.0, "zeroshot": {
        t: {"correct": c, "acc": sum(c) / len(c), "acc_stderr": 0.0, "items": len(c)}
        for t, c in correct_by_task.items()}}


def test_paired_difference_and_verdict():
    """The paired standard error uses per-question outcomes: two plans that differ on one
    question in 100 are not 'worse beyond noise'; one that loses 30 of 100 is."""
    a = _fake({"t": [1] * 100})
    b = _fake({"t": [1] * 99 + [0]})
    d, se = paired_diff(a, b, ["t"])
    assert d == pytest.approx(0.01) and se == pytest.approx(0.01)
    c = _fake({"t": [1] * 70 + [0] * 30})
    d, se = paired_diff(c, a, ["t"])
    assert d == pytest.approx(-0.3) and se == pytest.approx(math.sqrt(0.3 * 0.7 / 99) , rel=1e-6)
    mk = lambda ppl, corr: {**_fake({"t": corr}), "perplexity": ppl, "bundle": str(ppl)}
    res = {"jaccard": {}, "cosine": {}}
    for p in MIXES:
        res["jaccard"][p] = mk(10.0, [1] * 100)
        res["cosine"][p] = mk(11.0, [1] * 70 + [0] * 30)
    for p in ("fp16", "int8"):
        res["jaccard"][p] = res["cosine"][p] = mk(9.0, [1] * 100)
    v = verdict({"results": res, "metrics": ["jaccard", "cosine"], "tasks": {"names": ["t"]}})
    assert v["holds"] and v["text"].endswith(" points on average.") and "holds here" in v["text"]
    assert [c["acc_call"] for c in v["comparisons"]] == ["better"] * 3
    res["jaccard"]["50%"] = mk(12.0, [1] * 60 + [0] * 40)
    v = verdict({"results": res, "metrics": ["jaccard", "cosine"], "tasks": {"names": ["t"]}})
    assert not v["holds"] and "holds only in part" in v["text"]
    assert [c["acc_call"] for c in v["comparisons"]] == ["better", "worse", "better"]


@pytest.mark.slow
@pytest.mark.skipif(not (WIKITEXT.is_file() and C4.is_file() and (ZEROSHOT / "piqa").is_dir()),
                    reason="the quick study runs on ../shared/data")
def test_quick_study_on_the_real_model(tmp_path):
    """`study --quick` end to end on SmolLM2 with the real tasks, as a user runs it."""
    if not LM_EVAL:
        pytest.skip("needs lm-evaluation-harness for the cross-check")
    r = subprocess.run([sys.executable, "-m", "lsaq_compile.cli", "study", "--quick", "--metrics", "jaccard,zscore",
                        "--tasks", "arc_easy,piqa", "--text", str(WIKITEXT),
                        "--calibration", str(C4), "--data", str(ZEROSHOT), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((tmp_path / "out" / "results.json").read_text())
    assert s["quick"]
    fp16 = s["results"]["jaccard"]["fp16"]
    assert 15 < fp16["perplexity"] < 60      # SmolLM2-135M on WikiText-2, 512-token windows
    assert all(x["identical"] for x in s["cross_check"]["tasks"].values())
    assert "Does the paper's claim hold here?" in r.stdout and "(the paper's Table I)" in r.stdout
