"""The comparison study end to end on a tiny model: report, plots, budget table."""

import json

from conftest import C4
from lsaq_compile.progress import Progress
from lsaq_compile.study import PAPER_POINTS, run_study


def test_study_on_tiny_model(tiny_llama_dir, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("A held-out text about rivers, mountains and the sea. " * 400, encoding="utf-8")
    out = run_study(tiny_llama_dir, ("jaccard", "cosine", "zscore"), text, tmp_path / "results",
                    calibration=str(C4) if C4.is_file() else None, samples=4, seq_len=32,
                    eval_seq_len=64, windows=2, reference_windows=1, progress=Progress(quiet=True))
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
    report = (out / "report.md").read_text()
    assert "Table III" in report and "Table IV" in report
    for png in ("importance.png", "perplexity_vs_bits.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
