"""The paper's zero-shot tasks: published files -> lm-eval's prompts -> accuracies, and the
same questions through real lm-evaluation-harness."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from lsaq_compile import evaluate as ev
from lsaq_compile import zeroshot as zs
from lsaq_compile.errors import LsaqError
from factories.data import LM_EVAL, ZEROSHOT, write_tasks

CLI = [sys.executable, "-m", "lsaq_compile.cli"]
needs_lm_eval = pytest.mark.skipif(not LM_EVAL, reason="lm-evaluation-harness is not usable here")
needs_data = pytest.mark.skipif(not (ZEROSHOT / "piqa").is_dir(),
                                reason=f"the zero-shot tasks are not at {ZEROSHOT}")


@needs_data
def test_published_files_become_lm_eval_prompts():
    """The first question of each task, formatted as lm-eval's YAML formats it (written out by
    hand from the files and lm-eval's templates)."""
    piqa = zs.load_task("piqa", ZEROSHOT, 1)[0]
    goal = "How do I ready a guinea pig cage for it's new occupants?"
    assert piqa.requests[0][0] == f"Question: {goal}\nAnswer:"
    assert piqa.requests[0][1].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    assert piqa.label == 0 and piqa.norm_lengths == [len(r[1]) - 1 for r in piqa.requests]

    arc = zs.load_task("arc_challenge", ZEROSHOT, 1)[0]
    assert arc.requests[0] == ("Question: An astronomer observes that a planet rotates faster after a meteorite "
                               "impact. Which is the most likely effect of this increase in rotation?\nAnswer:",
                               " Planetary density will decrease.")
    assert len(arc.requests) == 4 and arc.label == 2   # answerKey C

    boolq = zs.load_task("boolq", ZEROSHOT, 1)[0]
    assert boolq.requests[0][0].startswith("Ethanol fuel -- All biomass goes through")
    assert boolq.requests[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in boolq.requests] == [" no", " yes"] and boolq.label == 0
    assert boolq.norm_lengths is None   # lm-eval's boolq reports acc only

    wino = zs.load_task("winogrande", ZEROSHOT, 1)[0]
    assert wino.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                             ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wino.label == 1 and wino.norm_lengths is None

    counts = {t: len(zs.load_docs(t, ZEROSHOT)) for t in zs.TASKS}
    assert counts == {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267}
    # WinoGrande's separate label file agrees with the answers the loader reads
    labels = (ZEROSHOT / "winogrande" / "dev-labels.lst").read_text().split()
    assert [d["answer"] for d in zs.load_docs("winogrande", ZEROSHOT)] == labels


def test_acc_norm_divides_by_characters_of_the_choice():
    """lm-eval normalises by len(choice) in characters, without the delimiter. Both choices
    below are 7 UTF-8 bytes with their space, so equally likely under uniform logits; per
    character " ééé" (3) is less likely than " abcdef" (6); per byte they would tie."""
    item = zs._item("piqa", {"goal": "g", "sol1": "ééé", "sol2": "abcdef", "label": 0})
    assert item.norm_lengths == [3, 6]

    def logits(ids):   # uniform over 8 tokens: each token costs log 8
        return np.zeros((len(ids), 8), np.float32)
    encode = lambda s: [b % 8 for b in s.encode("utf-8")]   # one token per byte
    r = ev.multiple_choice(logits, encode, [item])
    assert r["details"][0]["loglikelihoods"] == pytest.approx([-7 * math.log(8)] * 2)
    assert r["acc"] == 1.0 and r["acc_norm"] == 0.0   # a tie goes to the first choice, as np.argmax


def test_stderr_is_lm_evals():
    xs = [1, 0, 1, 1, 0, 1, 0, 1]
    p = np.mean(xs)
    assert ev.mean_stderr(xs) == pytest.approx(math.sqrt(p * (1 - p) / (len(xs) - 1)))


def test_bad_task_folders(tmp_path):
    with pytest.raises(LsaqError, match="unknown zero-shot task hellaswag"):
        zs.parse_tasks("piqa,hellaswag")
    assert zs.parse_tasks("all") == list(zs.TASKS)
    root = write_tasks(tmp_path / "z")
    with pytest.raises(LsaqError, match="not found; --data must be a folder"):
        zs.load_docs("piqa", tmp_path)
    (root / "piqa" / "valid-labels.lst").write_text("0\n")
    with pytest.raises(LsaqError, match="1 labels for 3 questions"):
        zs.load_docs("piqa", root)
    (root / "boolq" / "val.jsonl").write_text(json.dumps({"question": "q", "passage": "p", "label": "maybe"}) + "\n")
    with pytest.raises(LsaqError, match="val.jsonl:1: label 'maybe'"):
        zs.load_docs("boolq", root)
    (root / "arc_easy" / "ARC-Easy-Test.jsonl").write_text(json.dumps({"question": "no stem"}) + "\n")
    with pytest.raises(LsaqError, match="ARC-Easy-Test.jsonl:1: expected a dict field 'question'"):
        zs.load_docs("arc_easy", root)
    (root / "winogrande" / "winogrande_dev.jsonl").write_text(
        json.dumps({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}) + "\n")
    with pytest.raises(LsaqError, match="one '_'"):
        zs.load_docs("winogrande", root)


@needs_data
@needs_lm_eval
@pytest.mark.slow
def test_each_task_through_our_scorer_and_lm_eval(smollm_bundle, tmp_path):
    """Six questions of each task on the real model: lm-eval, from its own task definitions,
    builds the very requests we build, and gets the same log-likelihoods and accuracies."""
    from lsaq_compile.bundle import read_manifest
    from lsaq_compile.lm_eval_adapter import LsaqLM, zero_shot

    m = read_manifest(smollm_bundle)
    lm = LsaqLM(bundle=str(smollm_bundle), variant="fp16", device="cpu")
    ours = zs.evaluate_tasks(ev.onnx_logits_fn(smollm_bundle, m, "fp16"), lm._encode, list(zs.TASKS),
                             ZEROSHOT, limit=6)
    theirs = zero_shot(smollm_bundle, "fp16", list(zs.TASKS), ZEROSHOT, tmp_path / "lm_eval", limit=6, lm=lm)
    for t in zs.TASKS:
        o, th = ours[t], theirs[t]
        assert th["items"] == o["items"] == 6
        assert th["requests"] == [[tuple(r) for r in it.requests] for it in zs.load_task(t, ZEROSHOT, 6)], t
        for a, b in zip([d["loglikelihoods"] for d in o["details"]], th["loglikelihoods"]):
            assert a == pytest.approx(b, abs=1e-6), t
        for k in zs.TASKS[t].metrics:
            assert th[k] == o[k], (t, k)
            assert th[f"{k}_stderr"] == pytest.approx(o[f"{k}_stderr"]), (t, k)
        assert set(th) >= {f"{k}" for k in zs.TASKS[t].metrics}
        assert ("acc_norm" in th) == ("acc_norm" in zs.TASKS[t].metrics)
    # the model is not guessing on the easy tasks: a check that scores are real
    assert ours["arc_easy"]["acc"] + ours["piqa"]["acc"] > 0.5


@needs_lm_eval
def test_eval_cli_tasks_and_cross_check(tiny_bundle, tmp_path):
    import shutil

    # eval records results beside the manifest: on a copy, never on the session's shared bundle
    # (other tests read that bundle's file list and recorded evaluations)
    bundle = shutil.copytree(tiny_bundle, tmp_path / "b")
    root = write_tasks(tmp_path / "z")
    r = subprocess.run(CLI + ["eval", str(bundle), "--tasks", "piqa,winogrande", "--data", str(root),
                              "--variants", "fp16,int4", "--cross-check", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count(": identical") == 4, r.stdout
    rec = ev.read_evaluations(bundle)
    assert {(e["variant"], e["task"]) for e in rec if e["kind"] == "multiple_choice" and "task" in e} >= \
        {("fp16", "piqa"), ("int4", "winogrande")}
    r = subprocess.run(CLI + ["eval", str(bundle), "--tasks", "piqa"], capture_output=True, text=True)
    assert r.returncode == 2 and "need --data DIR" in r.stderr and "Traceback" not in r.stderr
