"""Where the shared text and zero-shot data live, whether lm-eval is usable, and a made-up
zero-shot data folder in the published formats."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


SHARED_DATA = REPO.parent / "shared" / "data"

C4 = SHARED_DATA / "c4-calibration.txt"

WIKITEXT = SHARED_DATA / "wikitext-2-raw-test.txt"

ZEROSHOT = SHARED_DATA / "zeroshot"

# lm-evaluation-harness is in the test extra; the dependency-floor run (older transformers and
# huggingface-hub, which lm-eval's `datasets` cannot use) turns it off.
LM_EVAL = importlib.util.find_spec("lm_eval") is not None and os.environ.get("LSAQ_SKIP_LM_EVAL") != "1"

def write_tasks(root, n=3):
    """A data folder in the published formats, with n made-up questions per task."""
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "valid.jsonl").write_text("".join(
        json.dumps({"goal": f"How do I open jar {i}?", "sol1": "Twist the lid.", "sol2": "Eat the lid."}) + "\n"
        for i in range(n)))
    (root / "piqa" / "valid-labels.lst").write_text("0\n" * n)
    for name, fname in (("arc_easy", "ARC-Easy-Test.jsonl"), ("arc_challenge", "ARC-Challenge-Test.jsonl")):
        (root / name).mkdir()
        (root / name / fname).write_text("".join(json.dumps({
            "id": f"q{i}", "question": {"stem": f"What is {i} plus one?", "choices": [
                {"text": str(i + 1), "label": "A"}, {"text": str(i + 7), "label": "B"},
                {"text": "a fish", "label": "C"}]}, "answerKey": "A"}) + "\n" for i in range(n)))
    (root / "boolq").mkdir()
    (root / "boolq" / "val.jsonl").write_text("".join(json.dumps({
        "question": "is water wet", "passage": f"Water -- Water is a liquid number {i}.", "idx": i,
        "label": "true" if i % 2 else "false"}) + "\n" for i in range(n)))
    (root / "winogrande").mkdir()
    (root / "winogrande" / "winogrande_dev.jsonl").write_text("".join(json.dumps({
        "sentence": f"The cup fell off the table because _ was tilted {i}.", "option1": "the cup",
        "option2": "the table", "answer": "2"}) + "\n" for i in range(n)))
    return root
