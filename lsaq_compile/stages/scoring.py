"""Stage: how much each layer (or each linear) matters. Measured sensitivity (sensitivity.py:
the KL of quantizing each linear alone) or a proxy metric (importance.py: Jaccard, cosine,
z-score), or scores given by the caller (`--scores`).

A measurement appends each finished (layer, unit) to the job's measurements.jsonl, so a
killed build resumes it where it stopped; scores.json is written only once it is whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import LsaqError
from ..job import MEASUREMENTS, BuildContext, Job, MeasurementLog, fingerprint, write_json_atomic

NAME = "scoring"
SCORES = "scores.json"


def run(job: Job, ctx: BuildContext) -> Job:
    from ..importance import Scores

    if job.finished(NAME) and job.folder is not None:
        ctx.scores = Scores.from_json(json.loads(job.path(SCORES).read_text(encoding="utf-8")))
        ctx.progress(f"scoring: reusing the finished {ctx.scores.metric} scores of the "
                     "interrupted build")
        return job
    if ctx.scores_given is not None:
        ctx.scores = given_scores(ctx.scores_given, ctx.source.spec.num_layers)
    else:
        ctx.scores, ctx.meter = measure(ctx, _log(job, ctx), job.folder)
    if job.folder is not None:
        write_json_atomic(job.path(SCORES), ctx.scores.to_json())
    return job.finish(NAME, {"scores": SCORES, "metric": ctx.scores.metric})


def _log(job: Job, ctx: BuildContext) -> MeasurementLog | None:
    """The job's per-linear measurement log, keyed to the job's inputs and calibration."""
    if job.folder is None:
        return None
    facts = [job.key, job.outputs.get("calibration", {}).get("windows_sha256")]
    if ctx.profile.scoring.measure == "fisher":   # float16 on a GPU differs from float32
        facts.append(resolve_device(ctx.device))
    return MeasurementLog(job.path(MEASUREMENTS), fingerprint(facts))


def resolve_device(device: str) -> str:
    """"cpu" or "cuda": what --device auto|cpu|cuda runs the torch stages on."""
    from ..estimate import _device

    return _device(device or "cpu").type


def measure(ctx: BuildContext, log: MeasurementLog | None = None, folder=None):
    """(Scores, KLMeter or None) measured now with the profile's calibration and quantizers
    (scoring.measure "exact": KLMeter, kept for the whole-plan checks; "fisher": the streamed
    estimate, its hidden states and gradient checkpointed in `folder` for a resumed build)."""
    from .. import sensitivity
    from ..importance import score_model

    sc = ctx.profile.scoring
    say = ctx.progress.stage("scoring")
    if ctx.metric == "sensitivity" and sc.measure == "fisher":
        from .. import estimate

        return estimate.score(ctx.source, ctx.calib, ctx.calib.windows, ctx.schemes,
                              ctx.act_stats, say, granularity=sc.granularity,
                              tables=ctx.profile.tables_on_ladder, log=log, probes=sc.probes,
                              device=ctx.device, checkpoint_dir=folder), None
    if ctx.metric == "sensitivity":
        return sensitivity.score(ctx.source, ctx.calib, ctx.calib.windows, ctx.schemes,
                                 ctx.act_stats, say, granularity=sc.granularity,
                                 tables=ctx.profile.tables_on_ladder, log=log)
    result = score_model(ctx.source, metrics=(ctx.metric,), k=sc.k, final_norm=sc.final_norm,
                         calibration=ctx.calib if ctx.metric != "zscore" else None,
                         progress=lambda i, n, s: say(f"layer {i + 1}/{n} ({s:.1f}s)"))
    return result[ctx.metric], None


def given_scores(scores, num_layers: int):
    """Scores from a scores.json path or a Scores object, checked to cover this model."""
    from ..importance import Scores

    if isinstance(scores, (str, os.PathLike)):
        p = Path(scores)
        try:
            scores = Scores.from_json(json.loads(p.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise LsaqError(f"{p}: scores file not found; make one with `lsaq-compile score`") from None
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, LsaqError) as e:
            why = e.strerror if isinstance(e, OSError) else e
            raise LsaqError(f"{p}: not a scores.json written by `lsaq-compile score` ({why}); "
                            "score the model again") from None
    if len(scores.importance) != num_layers:
        raise LsaqError(f"scores cover {len(scores.importance)} layers but the model has "
                        f"{num_layers}; score this model again")
    return scores
