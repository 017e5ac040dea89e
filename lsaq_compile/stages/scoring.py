"""Stage: how much each layer (or each linear) matters. Measured sensitivity (sensitivity.py:
the KL of quantizing each linear alone) or a proxy metric (importance.py: Jaccard, cosine,
z-score), or scores given by the caller (`--scores`).

A measurement appends each finished (layer, unit) to the job's measurements.jsonl, so a
killed build resumes it where it stopped; scores.json is written only once it is whole, and
the whole measurement is kept for every later build of the same inputs (measurements.py).
"""

from __future__ import annotations

import json
import os
import time
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
        ctx.scores, ctx.meter = measure_or_reuse(job, ctx)
    if job.folder is not None:
        write_json_atomic(job.path(SCORES), ctx.scores.to_json())
    return job.finish(NAME, {"scores": SCORES, "metric": ctx.scores.metric})


def measure_or_reuse(job: Job, ctx: BuildContext):
    """An earlier build's finished measurement of the same inputs (measurements.py), or a new
    one, which is then kept for the builds after this one."""
    from .. import measurements

    windows = job.outputs.get("calibration", {}).get("windows_sha256")
    key = measurements.key(ctx, windows)
    found = None if ctx.remeasure else measurements.lookup(key, ctx.progress)
    if found is not None:
        scores, facts = found
        ctx.progress(f"scoring: reusing the {scores.metric} measurement of an earlier build of "
                     f"this model (same calibration and quantizers; stored {facts.get('stored', '?')}"
                     f", {facts.get('seconds', 0):.0f} s saved); --remeasure measures again")
        return scores, None
    t0 = time.perf_counter()
    scores, meter = measure(ctx, _log(job, ctx))
    measurements.store(key, scores, {"model": ctx.source.spec.name, "metric": scores.metric,
                                     "seconds": round(time.perf_counter() - t0, 1)})
    return scores, meter


def _log(job: Job, ctx: BuildContext) -> MeasurementLog | None:
    """The job's per-linear measurement log, keyed to the job's inputs and calibration."""
    if job.folder is None:
        return None
    key = fingerprint([job.key, job.outputs.get("calibration", {}).get("windows_sha256")])
    return MeasurementLog(job.path(MEASUREMENTS), key)


def measure(ctx: BuildContext, log: MeasurementLog | None = None):
    """(Scores, KLMeter or None) measured now with the profile's calibration and quantizers."""
    from .. import sensitivity
    from ..importance import score_model

    sc = ctx.profile.scoring
    say = ctx.progress.stage("scoring")
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
