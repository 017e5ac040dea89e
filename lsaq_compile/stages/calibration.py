"""Stage: calibration windows (scoring, held-out quality) and activation statistics.

The windows are cut again on a resumed build (cheap, deterministic) and checked against the
record's fingerprint; the activation statistics (clip 'mse-act') are loaded from the record.
"""

from __future__ import annotations

import numpy as np

from ..devices import device_type
from ..errors import LsaqError, NonFiniteError
from ..job import BuildContext, Job

NAME = "calibration"
ACTIVATIONS = "activations.npz"


def run(job: Job, ctx: BuildContext) -> Job:
    ctx.calib, ctx.held_out = windows(ctx)
    facts = {"windows_sha256": _fingerprint(ctx.calib), "held_out_sha256":
             _fingerprint(ctx.held_out)}
    ctx.dtype = "float32" if ctx.profile.scoring.dtype == "float32" else None
    if job.finished(NAME):
        old = job.outputs[NAME]
        if {k: old.get(k) for k in facts} != facts:
            raise LsaqError(f"{job.folder}: the interrupted build calibrated on other text (its "
                            "calibration windows differ); build without --resume to start over")
        if old.get("activations"):
            ctx.act_stats = _load_stats(job.path(old["activations"]))
            ctx.act_calib = old["act_calib"]
            ctx.dtype = old.get("compute_dtype")
            return job
    ctx.act_stats, ctx.act_calib = activation_stats(ctx, job)
    if ctx.act_stats is not None and job.folder is not None:
        _save_stats(job.path(ACTIVATIONS), ctx.act_stats)
        facts.update(activations=ACTIVATIONS, act_calib=ctx.act_calib, compute_dtype=ctx.dtype)
    return job.finish(NAME, facts)


def windows(ctx: BuildContext):
    """(scoring calibration, held-out windows): scoring.samples windows of the calibration text
    and build.quality_samples more from the gaps between them, for measuring each variant's
    quality. (None, None) when nothing needs text."""
    from ..calibration import load_calibration, load_tokenizer

    prof = ctx.profile
    sc, held = prof.scoring, prof.build.quality_samples
    if ctx.metric == "zscore" and not held and prof.quantization.clip != "mse-act":
        return None, None
    calib = load_calibration(sc.calibration or None, load_tokenizer(ctx.source),
                             samples=sc.samples, seq_len=sc.seq_len, held_out=held)
    return calib, calib.held_out


def activation_stats(ctx: BuildContext, job: Job | None = None):
    """(stats, calibration facts) for clip 'mse-act', measured on the scoring calibration
    windows; (None, None) for the other clips, which need no activations. In a job folder the
    pass's states are kept as the FP16 reference of the passes after it, where they are
    theirs bit for bit (estimate.reference_sink)."""
    if ctx.profile.quantization.clip != "mse-act":
        return None, None
    from ..activations import activation_stats as measure, windows_fingerprint
    from ..estimate import PASS_BATCH, reference_sink
    from ..job import PLAN_STATES

    calib = ctx.calib
    log = ctx.progress.stage("activations")
    sink = None
    if (job is not None and job.folder is not None and ctx.metric == "sensitivity"
            and ctx.profile.scoring.measure == "fisher"):   # the streamed passes read them
        sink = reference_sink(ctx.source, calib.windows, job.path(PLAN_STATES))

    def forward(dtype):
        return measure(ctx.source, calib.windows, device=ctx.device, batch_size=PASS_BATCH,
                       on_output=sink, dtype=dtype,
                       progress=lambda i, n, s: log(f"layer {i + 1}/{n} ({s:.1f}s)"))

    try:
        stats = forward(ctx.dtype)
    except NonFiniteError as e:
        if ctx.dtype is not None or device_type(ctx.device) == "cpu":
            raise
        # float16 on a GPU: a residual past 65,504 (Gemma's at BOS). Every pass that must
        # compute what the FP16 model does computes in float32 from here (one layer at a time:
        # twice float16's memory for that layer)
        log(f"{e}: the model's states pass float16's range; every pass computes in float32")
        ctx.dtype = "float32"
        stats = forward(ctx.dtype)
    return stats, {"source": calib.source, "sha256": calib.sha256, "samples": calib.samples,
                   "seq_len": calib.seq_len, "windows_sha256": windows_fingerprint(calib.windows)}


def _fingerprint(calib_or_windows) -> str | None:
    from ..activations import windows_fingerprint

    if calib_or_windows is None:
        return None
    w = getattr(calib_or_windows, "windows", calib_or_windows)
    return windows_fingerprint(w)


def _save_stats(path, stats: dict) -> None:
    part = path.with_name(f".{path.name}.part")
    with open(part, "wb") as f:
        np.savez(f, **stats)
    part.replace(path)


def _load_stats(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
