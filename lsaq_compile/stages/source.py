"""Stage: open the model and fix what this job compiles (the job record's inputs)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from ..job import BuildContext, Job, fingerprint
from ..model_source import open_model

NAME = "source"


def run(job: Job, ctx: BuildContext) -> Job:
    if ctx.source is None:
        ctx.source = open_model(ctx.model)
        spec = ctx.source.spec
        ctx.progress(f"model: {spec.name} ({spec.architecture}, {spec.num_layers} layers, "
                     f"hidden {spec.hidden_size}) from {ctx.source.path}")
    ctx.schemes = ctx.settings.schemes()
    if job.folder is None:   # scoring alone: nothing to resume, nothing to fingerprint
        return job.finish(NAME)
    inputs = job_inputs(ctx)
    if job.done:
        # A resumed job keeps its record's inputs: its key names its measurements so far.
        job.check_inputs(inputs, without_writer_settings)
    else:
        job.inputs = inputs
    if ctx.bundle_dir is not None:   # cheap, so written again by a resumed build
        ctx.tokenizer = ctx.source.save_tokenizer(ctx.bundle_dir / "tokenizer")
        if ctx.chat_template is not None:
            ctx.tokenizer["chat_template"] = ctx.chat_template
    return job.finish(NAME, {"model": str(ctx.source.path), "sha256": inputs["model"]})


def job_inputs(ctx: BuildContext) -> dict:
    """What decides every output of the build: a job record made from other inputs is never
    continued. (The calibration text is checked by its windows, in the calibration stage.)"""
    from ..devices import device_type

    return {"model": ctx.source.fingerprint(),
            "profile": dataclasses.asdict(ctx.profile),
            "metric": ctx.metric,
            "device": device_type(ctx.device),   # a GPU's float16 measures other numbers
            "scores": _scores_fingerprint(ctx.scores_given),
            "chat_template": (hashlib.sha256(ctx.chat_template.encode()).hexdigest()
                              if ctx.chat_template is not None else None)}


# Profile settings only the writer stage reads. The writer runs anew on every resume, so a
# resumed build may change them: say --quality-engine streamed after the graphs ran out of
# memory at the quality stage, hours into a build.
WRITER_SETTINGS = ("quality_engine", "streamed_quality_samples")


def without_writer_settings(inputs: dict) -> dict:
    out = json.loads(json.dumps(inputs, default=str))
    build = out.get("profile", {}).get("build", {})
    for k in WRITER_SETTINGS:
        build.pop(k, None)
    return out


def _scores_fingerprint(scores) -> str | None:
    if scores is None:
        return None
    if isinstance(scores, (str, os.PathLike)):
        try:
            with open(scores, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return f"unreadable:{os.fspath(scores)}"   # the scoring stage says why
    return fingerprint(json.loads(json.dumps(scores.to_json(), default=str)))
