"""The job record of a build: what each stage finished and where its outputs lie.

A build runs its stages in order (`build.STAGES`); each is `run(job, ctx) -> job`. `ctx`
(BuildContext) carries what the stages share in memory; the `Job` is what persists, as
`.lsaq-job/job.json` in the build's working folder, rewritten atomically after every stage. A build
killed midway is continued with `lsaq-compile build --resume`: finished stages load their
recorded outputs instead of running again (exllamav2's `conversion/` job, the same idea).

Within the measurement every finished (layer, unit) appends one line to `measurements.jsonl`,
so a resumed build measures only what is missing. The record and that file carry a
fingerprint of their inputs (model files, profile, metric, calibration windows): a record from
other inputs is refused, never reused. A partial measurement is never taken for a whole one:
the scoring stage counts as finished only once every measurement is there and `scores.json`
is written, and a line cut short by the kill is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LsaqError

JOB_DIR = ".lsaq-job"       # inside the build's working folder (the bundle being assembled)
JOB_FILE = "job.json"
MEASUREMENTS = "measurements.jsonl"
CANDIDATES = "candidates"     # every quantized linear, made once: estimate, plan checks, store
PLAN_STATES = "plan-states"   # whole-plan hidden states: the FP16 reference and the rungs, for later passes
JOB_FORMAT = "lsaq-build-job"
JOB_VERSION = 1


def fingerprint(facts) -> str:
    """sha256 of a JSON-able value, keys sorted: equal inputs give equal fingerprints."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def write_json_atomic(path: Path, value) -> None:
    """Write, fsync, rename: a kill leaves the old file or the new one, never half of one."""
    part = path.with_name(f".{path.name}.part")
    with open(part, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


@dataclass
class Job:
    """Stages finished, in order, and what each recorded (file names inside `folder`, facts)."""

    folder: Path | None                           # None: nothing persisted (scoring alone)
    inputs: dict                                  # what this job compiles (see build.job_inputs)
    done: list[str] = field(default_factory=list)
    outputs: dict[str, dict] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return fingerprint(self.inputs)

    def finished(self, stage: str) -> bool:
        return stage in self.done

    def finish(self, stage: str, outputs: dict | None = None) -> "Job":
        """Record a stage as finished with its outputs, and save the record."""
        self.outputs[stage] = outputs or {}
        if stage not in self.done:
            self.done.append(stage)
        self.save()
        return self

    def path(self, name: str) -> Path:
        return self.folder / name

    def to_json(self) -> dict:
        return {"format": JOB_FORMAT, "version": JOB_VERSION, "inputs": self.inputs,
                "fingerprint": self.key, "done": self.done, "outputs": self.outputs}

    def save(self) -> None:
        if self.folder is not None:
            write_json_atomic(self.path(JOB_FILE), self.to_json())

    @classmethod
    def load(cls, folder: Path) -> "Job":
        path = Path(folder) / JOB_FILE
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") != JOB_FORMAT or d.get("version") != JOB_VERSION:
                raise ValueError("not a job record of this version")
            job = cls(Path(folder), d["inputs"], list(d["done"]), dict(d["outputs"]))
            if not (isinstance(job.inputs, dict) and all(isinstance(s, str) for s in job.done)):
                raise ValueError("malformed")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LsaqError(f"{path}: the interrupted build's job record cannot be read "
                            f"({getattr(e, 'strerror', None) or e}); build without --resume "
                            "to start over") from None
        return job

    def check_inputs(self, inputs: dict, comparable=lambda d: d) -> None:
        """Refuse to continue a record made from other inputs, naming what differs; both
        sides are compared through `comparable` (what may change across a resume dropped)."""
        old, new = comparable(self.inputs), comparable(inputs)
        if old == new:
            return
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise LsaqError(f"{self.folder}: the interrupted build compiled other inputs "
                        f"({', '.join(differ)} differ); build without --resume to start over")


class MeasurementLog:
    """Finished single-unit measurements, one JSON line each, after a header line holding the
    fingerprint of what they were measured on. Appended and flushed as each finishes."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def read(self) -> dict[tuple, dict[str, float]]:
        """{("layer", i, unit) or ("table", name): {precision: KL}} of the finished ones."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0]) if lines else {}
        except ValueError:
            head = {}
        if head.get("fingerprint") != self.key:
            raise LsaqError(f"{self.path}: these measurements were made on other inputs (model, "
                            "profile or calibration differ); build without --resume to start "
                            "over")
        known = {}
        for line in lines[1:]:
            try:
                rec = json.loads(line)
                known[tuple(rec["key"])] = {str(p): float(v) for p, v in rec["cost"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                continue   # a line the kill cut short: that unit is measured again
        return known

    def start(self) -> None:
        """A new log, unless one with this fingerprint is there to continue."""
        if self.path.is_file():
            self.read()    # raises for other inputs
            return
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": self.key}) + "\n")

    def append(self, key: tuple, cost: dict[str, float]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"key": list(key), "cost": cost}) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class BuildContext:
    """What the stages share in memory during one build (the job record holds what persists)."""

    model: object                      # path or None (the default SmolLM2)
    out: Path                          # the bundle's target folder
    profile: object                    # profiles.Profile
    settings: object                   # quantize.QuantSettings
    metric: str
    progress: object                   # progress.Progress
    bundle_dir: Path | None = None     # where the bundle is assembled (None: scoring only)
    scores_given: object = None        # a scores.json path or Scores to reuse
    chat_template: str | None = None
    resumed: bool = False
    remeasure: bool = False            # measure even when an earlier build's measurement fits
    device: str = "cpu"                # torch stages: auto | cpu | cuda
    # the dtype of the passes that compute what the FP16 model does (activations, token tables,
    # whole plans): None, the device's (float32 on the CPU, float16 on a GPU), or "float32"
    # (asked for, or where float16 overflowed: the calibration stage decides and records it)
    dtype: str | None = None
    # filled in by the stages, in pipeline order
    source: object = None
    schemes: dict = field(default_factory=dict)
    calib: object = None
    held_out: object = None
    act_stats: dict | None = None
    act_calib: dict | None = None
    scores: object = None
    meter: object = None
    plans: list = field(default_factory=list)
    plan_kl: dict = field(default_factory=dict)
    additive: dict = field(default_factory=dict)
    tied: bool = False
    head_int8: bool = False
    quantized: dict = field(default_factory=dict)
    needed: dict = field(default_factory=dict)
    table_needed: dict = field(default_factory=dict)
    index: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    params: int = 0
    variants: list = field(default_factory=list)
    f16_facts: dict | None = None
    manifest: dict = field(default_factory=dict)
