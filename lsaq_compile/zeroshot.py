"""Stage 6b: the paper's zero-shot tasks (its Table I), offline, posed exactly as
lm-evaluation-harness poses them.

A data folder laid out like ../shared/data/zeroshot holds each task's published files. Every
record becomes the document the Hugging Face dataset that lm-eval loads would hold (same field
names and types), then a question in lm-eval 0.4's format (its task YAMLs):

    piqa           "Question: {goal}\\nAnswer:"  + " sol1" | " sol2"            acc, acc_norm
    arc_easy/      "Question: {question}\\nAnswer:" + " {choice}" per choice     acc, acc_norm
    arc_challenge
    boolq          "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" | " yes" acc
    winogrande     partial scoring: context = sentence up to "_" with the option filled in,
                   continuation = " " + the rest of the sentence                 acc

acc_norm divides by the choice's length in characters, as lm-eval's process_results does.
`write_lm_eval_tasks` writes the same documents as JSONL and task YAMLs that include lm-eval's
own definitions, so real lm-eval scores the very same items (the cross-check).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import LsaqError
from .evaluate import ChoiceItem


@dataclass(frozen=True)
class Task:
    name: str          # lm-eval's task name
    title: str         # the paper's column header
    files: tuple[str, ...]
    split: str         # the split lm-eval scores
    metrics: tuple[str, ...]


TASKS = {t.name: t for t in (
    Task("piqa", "PIQA", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation", ("acc", "acc_norm")),
    Task("arc_easy", "ARC-e", ("arc_easy/ARC-Easy-Test.jsonl",), "test", ("acc", "acc_norm")),
    Task("arc_challenge", "ARC-c", ("arc_challenge/ARC-Challenge-Test.jsonl",), "test", ("acc", "acc_norm")),
    Task("boolq", "BoolQ", ("boolq/val.jsonl",), "validation", ("acc",)),
    Task("winogrande", "WinoGrande", ("winogrande/winogrande_dev.jsonl",), "validation", ("acc",)),
)}


def parse_tasks(spec: str) -> list[str]:
    """'all' or a comma list of task names."""
    names = list(TASKS) if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise LsaqError(f"unknown zero-shot task {', '.join(bad) or repr(spec)}; "
                        f"known: {', '.join(TASKS)} (or all)")
    return names


def _jsonl(path: Path) -> list[tuple[int, dict]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LsaqError(f"{path}:{n}: not JSON ({e.msg})") from None
    return out


def _field(path, n, d, key, kind=str):
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, kind):
        raise LsaqError(f"{path}:{n}: expected a {kind.__name__} field {key!r}; "
                        f"is this the published file of the task?")
    return v


def load_docs(name: str, data_dir: str | os.PathLike) -> list[dict]:
    """The task's documents, with the field names and types of the dataset lm-eval loads."""
    task = TASKS[name]
    root = Path(data_dir)
    paths = [root / f for f in task.files]
    for p in paths:
        if not p.is_file():
            raise LsaqError(f"{name}: {p} not found; --data must be a folder laid out like "
                            f"shared/data/zeroshot (one subfolder per task, published file names)")
    try:
        if name == "piqa":
            rows = _jsonl(paths[0])
            labels = paths[1].read_text(encoding="utf-8").split()
            if len(labels) != len(rows):
                raise LsaqError(f"{paths[1]}: {len(labels)} labels for {len(rows)} questions in {paths[0]}")
            docs = []
            for (n, d), y in zip(rows, labels):
                if y not in ("0", "1"):
                    raise LsaqError(f"{paths[1]}: label {y!r} is not 0 or 1")
                docs.append({"goal": _field(paths[0], n, d, "goal"), "sol1": _field(paths[0], n, d, "sol1"),
                             "sol2": _field(paths[0], n, d, "sol2"), "label": int(y)})
            return docs
        if name in ("arc_easy", "arc_challenge"):
            docs = []
            for n, d in _jsonl(paths[0]):
                q = _field(paths[0], n, d, "question", dict)
                ch = _field(paths[0], n, q, "choices", list)
                texts = [_field(paths[0], n, c, "text") for c in ch]
                keys = [_field(paths[0], n, c, "label") for c in ch]
                key = _field(paths[0], n, d, "answerKey")
                if key not in keys:
                    raise LsaqError(f"{paths[0]}:{n}: answerKey {key!r} is not among the labels {keys}")
                docs.append({"id": str(d.get("id", n)), "question": _field(paths[0], n, q, "stem"),
                             "choices": {"text": texts, "label": keys}, "answerKey": key})
            return docs
        if name == "boolq":
            docs = []
            for n, d in _jsonl(paths[0]):
                y = d.get("label")
                y = {"true": 1, "false": 0}.get(str(y).lower()) if not isinstance(y, bool) else int(y)
                if y is None:
                    raise LsaqError(f"{paths[0]}:{n}: label {d.get('label')!r} is not true/false")
                docs.append({"question": _field(paths[0], n, d, "question"),
                             "passage": _field(paths[0], n, d, "passage"),
                             "idx": int(d.get("idx", n - 1)), "label": y})
            return docs
        if name == "winogrande":
            docs = []
            for n, d in _jsonl(paths[0]):
                s = _field(paths[0], n, d, "sentence")
                a = _field(paths[0], n, d, "answer")
                if s.count("_") != 1 or a not in ("1", "2"):
                    raise LsaqError(f"{paths[0]}:{n}: a WinoGrande sentence has one '_' and answer '1' or '2'")
                docs.append({"sentence": s, "option1": _field(paths[0], n, d, "option1"),
                             "option2": _field(paths[0], n, d, "option2"), "answer": a})
            return docs
    except UnicodeDecodeError as e:
        raise LsaqError(f"{name}: a file under {root} is not UTF-8 ({e})") from None
    raise AssertionError(name)


def _item(name: str, d: dict) -> ChoiceItem:
    """One document as lm-eval asks it (target_delimiter " ")."""
    if name == "piqa":
        return _choices("Question: " + d["goal"] + "\nAnswer:", [d["sol1"], d["sol2"]], d["label"], True)
    if name in ("arc_easy", "arc_challenge"):
        return _choices("Question: " + d["question"] + "\nAnswer:", d["choices"]["text"],
                        d["choices"]["label"].index(d["answerKey"]), True)
    if name == "boolq":
        return _choices(d["passage"] + "\nQuestion: " + d["question"] + "?\nAnswer:", ["no", "yes"],
                        d["label"], False)
    if name == "winogrande":
        i = d["sentence"].index("_")
        target = d["sentence"][i + 1:].strip()
        contexts = [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]]
        return ChoiceItem([(c, " " + target) for c in contexts], {"1": 0, "2": 1}[d["answer"]])
    raise AssertionError(name)


def _choices(context: str, choices: list[str], label: int, norm: bool) -> ChoiceItem:
    return ChoiceItem([(context, " " + c) for c in choices], label,
                      [len(c) for c in choices] if norm else None)


def load_task(name: str, data_dir, limit: int | None = None) -> list[ChoiceItem]:
    """The first `limit` questions of the task (all with None), as lm-eval's --limit takes them."""
    docs = load_docs(name, data_dir)
    return [_item(name, d) for d in (docs if limit is None else docs[:limit])]


def evaluate_tasks(logits_fn, encode, names: list[str], data_dir, limit: int | None = None,
                   progress=None) -> dict[str, dict]:
    """Each task's metrics (lm-eval's: acc, and acc_norm where it has one) on one variant."""
    from .evaluate import multiple_choice

    out = {}
    for name in names:
        items = load_task(name, data_dir, limit)
        log = (lambda msg, name=name: progress(f"{name}: {msg}")) if progress else None
        out[name] = multiple_choice(logits_fn, encode, items, progress=log)
    return out


# ---------------------------------------------------------------- real lm-eval on the same items
def agrees(ours: dict, theirs: dict) -> bool:
    """Same number of questions and the very same acc and acc_norm (where the task has it)."""
    return theirs["items"] == ours["items"] and all(ours.get(k) == theirs.get(k) for k in ("acc", "acc_norm"))


def write_lm_eval_tasks(names: list[str], data_dir, out_dir) -> dict[str, str]:
    """Documents as JSONL and one task YAML per task that includes lm-eval's own definition
    (prompt templates, metrics) and only swaps the dataset for the local file. Returns
    {our name: the lm-eval task name}; pass `out_dir` to lm-eval as its include path."""
    from lm_eval.tasks import TaskManager

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = TaskManager().task_index
    registered = {}
    for name in names:
        entry = index.get(name)
        yaml = entry.get("yaml_path") if isinstance(entry, dict) else getattr(entry, "yaml_path", None)
        if not yaml or yaml == -1:
            raise LsaqError(f"this lm-eval has no built-in task {name!r} to cross-check against")
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in load_docs(name, data_dir)), encoding="utf-8")
        split = TASKS[name].split
        task = f"lsaq_{name}"
        lines = [f"include: {json.dumps(str(yaml))}",
                 f"task: {task}", "tag: []", "dataset_path: json", "dataset_name: null",
                 "dataset_kwargs:", "  data_files:", f"    {split}: {json.dumps(str(data.resolve()))}",
                 "training_split: null", "fewshot_split: null",
                 f"validation_split: {'validation' if split == 'validation' else 'null'}",
                 f"test_split: {'test' if split == 'test' else 'null'}"]
        (out / f"{task}.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
        registered[name] = task
    return registered
