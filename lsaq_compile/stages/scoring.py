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

from ..devices import device_type
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
    scores, meter = measure(ctx, _log(job, ctx), job.folder)
    measurements.store(key, scores, {"model": ctx.source.spec.name, "metric": scores.metric,
                                     "seconds": round(time.perf_counter() - t0, 1)})
    return scores, meter


def _log(job: Job, ctx: BuildContext) -> MeasurementLog | None:
    """The job's per-linear measurement log, keyed to the job's inputs and calibration."""
    if job.folder is None:
        return None
    # job.key holds the model, profile (scoring.dtype too) and device; the compute dtype is
    # decided later, by the calibration stage (float32 where float16 overflowed)
    facts = [job.key, job.outputs.get("calibration", {}).get("windows_sha256")]
    if ctx.profile.scoring.measure == "fisher" and ctx.dtype is not None:
        facts.append(ctx.dtype)
    return MeasurementLog(job.path(MEASUREMENTS), fingerprint(facts))


def measure(ctx: BuildContext, log: MeasurementLog | None = None, folder=None):
    """(Scores, KLMeter or None) measured now with the profile's calibration and quantizers
    (scoring.measure "exact": KLMeter, kept for the whole-plan checks; "fisher": the streamed
    estimate, its hidden states and gradient checkpointed in `folder` for a resumed build)."""
    from .. import sensitivity
    from ..importance import score_model

    sc = ctx.profile.scoring
    say = ctx.progress.stage("scoring")
    if ctx.metric == "sensitivity" and ctx.calib is not None:
        check_memory(ctx, say)
    if ctx.metric == "sensitivity" and sc.measure == "fisher":
        from .. import estimate

        return estimate.score(ctx.source, ctx.calib, ctx.calib.windows, ctx.schemes,
                              ctx.act_stats, say, granularity=sc.granularity,
                              tables=ctx.profile.tables_on_ladder, log=log, probes=sc.probes,
                              device=ctx.device, dtype=ctx.dtype, checkpoint_dir=folder,
                              probe_dtype=None if sc.dtype == "auto" else sc.dtype), None
    if ctx.metric == "sensitivity":
        return sensitivity.score(ctx.source, ctx.calib, ctx.calib.windows, ctx.schemes,
                                 ctx.act_stats, say, granularity=sc.granularity,
                                 tables=ctx.profile.tables_on_ladder, log=log,
                                 device=ctx.device)
    result = score_model(ctx.source, metrics=(ctx.metric,), k=sc.k, final_norm=sc.final_norm,
                         calibration=ctx.calib if ctx.metric != "zscore" else None,
                         progress=lambda i, n, s: say(f"layer {i + 1}/{n} ({s:.1f}s)"))
    return result[ctx.metric], None


GiB = 1 << 30


def memory_need(spec, measure: str, samples: int, seq_len: int, probes: int = 16,
                tied: bool = True) -> int:
    """Bytes of host memory the sensitivity measurement is expected to hold at its peak.

    exact (KLMeter): every decoder linear as float32 plus its INT8 and INT4 candidates (12
    bytes a weight), the token tables as float32 with one quantized copy, every layer's input
    and the reference distributions (float32). fisher (estimate.py): one layer three times
    (source arrays, compute copy, a quantized candidate), the tables as float16 plus their
    quantized copies (at most 1 GiB kept), the probes' gradient twice (float32), the head's
    row chunks. Hidden states above 256 MiB are memory-mapped, so not counted. Both add
    BASELINE, what the process holds before measuring."""
    from ..plan import part_params

    return BASELINE + _need(spec, measure, samples, seq_len, probes, tied, part_params(spec))


BASELINE = 1 << 30   # the interpreter, torch and transformers themselves (about 0.96 GB measured)


def _need(spec, measure, samples, seq_len, probes, tied, parts) -> int:
    linear = sum(parts.values())
    tables = (1 if tied else 2) * spec.vocab_size * spec.hidden_size
    tokens = samples * seq_len
    if measure == "exact":
        return (12 * linear * spec.num_layers + 4 * tables + 4 * spec.vocab_size * spec.hidden_size
                + 4 * (spec.num_layers + 1) * tokens * spec.hidden_size
                + 8 * tokens * spec.vocab_size)
    from ..estimate import HEAD_CHUNK, QUANTIZED_TABLE_CACHE

    hidden = 2 * (spec.num_layers + 1) * tokens * spec.hidden_size
    return (12 * linear + 2 * tables
            + min(QUANTIZED_TABLE_CACHE, 8 * spec.vocab_size * spec.hidden_size)
            + 2 * 4 * probes * tokens * spec.hidden_size
            + 4 * tokens * (min(HEAD_CHUNK, spec.vocab_size) * 3 + probes * spec.hidden_size)
            + (hidden if hidden <= 256 << 20 else 0))


def check_memory(ctx: BuildContext, say) -> None:
    """Refuse, before hours of work, a measurement that cannot fit in the host's memory (or
    the container's limit), with the estimate and what would fit."""
    from lsaq_runtime.probe import probe_host

    from ..export_onnx import LM_HEAD

    sc = ctx.profile.scoring
    spec = ctx.source.spec
    tied = spec.tie_word_embeddings or not ctx.source.has_tensor(LM_HEAD)
    need = {m: memory_need(spec, m, sc.samples, sc.seq_len, sc.probes, tied)
            for m in ("exact", "fisher")}
    if sc.measure == "exact" and device_type(ctx.device) == "cuda":
        # KLMeter holds the whole model and its candidates on the device it computes on
        import torch

        from ..devices import _device

        free_gpu = torch.cuda.mem_get_info(_device(ctx.device))[0]
        say(f"exact measurement: about {need['exact'] / GiB:.1f} GiB of GPU memory expected, "
            f"{free_gpu / GiB:.1f} GiB free")
        if need["exact"] > free_gpu:
            raise LsaqError(f"the exact sensitivity measurement holds the whole model on the GPU: "
                            f"about {need['exact'] / GiB:.1f} GiB, but {free_gpu / GiB:.1f} GiB "
                            "of GPU memory is free; scoring.measure = \"fisher\" (--measure "
                            "fisher) streams it a layer at a time, or --device cpu")
    try:
        free = probe_host().free_bytes
    except Exception:     # no way to tell: measure, as before
        return
    say(f"{sc.measure} measurement: about {need[sc.measure] / GiB:.1f} GiB of memory expected, "
        f"{free / GiB:.1f} GiB available")
    if need[sc.measure] > free:
        alt = ("; scoring.measure = \"fisher\" (--measure fisher) streams the model in about "
               f"{need['fisher'] / GiB:.1f} GiB" if sc.measure == "exact" else
               "; fewer scoring.samples or probes need less")
        raise LsaqError(f"the {sc.measure} sensitivity measurement of this model needs about "
                        f"{need[sc.measure] / GiB:.1f} GiB of memory but {free / GiB:.1f} GiB "
                        f"is available{alt}")


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
