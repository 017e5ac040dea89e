"""The compiler's orchestrator: run the stages (stages/) in order on one job record, in a
working folder beside the target, and put the finished bundle in place.

Scores are measured once and reused for every variant, and by every later build of the same
inputs (measurements.py: exllamav2's measure-once idea); a killed build continues with `resume=True` (`lsaq-compile build --resume`), reusing every
finished stage and every finished measurement.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import folders
from .errors import LsaqError, Terminated
from .job import JOB_DIR, BuildContext, Job
from .profiles import Profile, load_profile
from .progress import Progress
from .quantize import QuantSettings
from . import stages

STAGES = stages.PIPELINE


def build_bundle(model: str | os.PathLike | None = None, out: str | os.PathLike = "bundle",
                 profile: str | Profile | None = None, scores=None, metric: str | None = None,
                 force: bool = False, progress: Progress | None = None,
                 chat_template: str | None = None, resume: bool = False,
                 remeasure: bool = False, device: str = "cpu",
                 measure: str | None = None) -> Path:
    """Compile `model` (None = the default SmolLM2) into a bundle folder at `out`.
    chat_template: a Jinja template to ship instead of the source's (many GGUFs carry none).
    resume: continue the interrupted build of `out` (same inputs) where it stopped.
    remeasure: measure even when an earlier build kept a measurement of the same inputs.
    device: where the torch stages run (auto | cpu | cuda); measure: override the profile's
    scoring.measure (exact | fisher)."""
    progress = progress or Progress()
    # A Profile object from the API is checked like a TOML file: a bad setting is refused
    # here, before any work, not by the stage that first reads it.
    prof = profile.validate() if isinstance(profile, Profile) else load_profile(profile)
    if measure is not None:
        prof = with_measure(prof, measure)
    from .devices import _device

    dev = _device(device)   # refused in one line where it cannot run
    check_compute_dtype(dev.type, prof, metric)
    # Absolute: `-o .` names the folder by its own name, so the working folder goes beside
    # it, not inside it.
    out = Path(os.path.abspath(out))
    folders._recover_swap(out, progress)
    folders.check_replaceable(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LsaqError(f"{out.parent}: cannot create the output folder ({e.strerror})") from None
    work = folders.adopt_work_dir(out) if resume else None
    folders._clean_stale_tmp(out)

    t0 = time.perf_counter()
    ctx = BuildContext(model, out, prof, QuantSettings.from_profile(prof.quantization),
                       metric or prof.scoring.metric, progress, scores_given=scores,
                       chat_template=chat_template, resumed=resume, remeasure=remeasure,
                       device=device)
    job = None
    try:
        if work is None:
            work = folders.new_work_dir(out)
            job = Job(work / JOB_DIR, {})
        else:
            job = _resumed_job(work, progress)
        ctx.bundle_dir = work
        for stage in STAGES:
            job = stage.run(job, ctx)
        folders.swap_in_work(work, out, force)
    except BaseException as e:
        # Kept for --resume: a resumed record (for another try), and an interrupted build's
        # finished stages. A later build without --resume cleans the folder up.
        interrupted = (isinstance(e, (KeyboardInterrupt, Terminated)) and job is not None
                       and bool(job.done))
        if interrupted:
            progress(f"interrupted after stage {job.done[-1]}; `lsaq-compile build --resume` "
                     "with the same arguments continues it")
        if not (resume or interrupted):
            _drop(work)
        if isinstance(e, OSError):
            where = e.filename or out
            raise LsaqError(f"{where}: cannot write the bundle ({e.strerror or e}); nothing was "
                            "written: free disk space or choose another -o") from None
        raise
    progress(f"bundle written to {out} in {time.perf_counter() - t0:.1f}s")
    if dev.type == "cuda":   # the torch stages' own peak (NVML also counts others)
        import torch

        progress(f"GPU memory: peak {torch.cuda.max_memory_allocated(dev) / 2**20:,.0f} MiB "
                 f"allocated by torch, {torch.cuda.max_memory_reserved(dev) / 2**20:,.0f} MiB "
                 "reserved")
    return out


def with_measure(prof: Profile, measure: str) -> Profile:
    """A copy of `prof` measuring sensitivity by `measure` (checked like the profile's own)."""
    import copy

    prof = copy.deepcopy(prof)
    prof.scoring.measure = measure
    return prof.validate()


def check_compute_dtype(device_type: str, prof: Profile, metric: str | None = None) -> None:
    """Refuse, before any work, a half-precision estimate on a CPU that multiplies in that
    dtype far slower than in float32 (no bfloat16/float16 instructions): what would take an
    hour would take days."""
    from .devices import HALF_SLOWDOWN_MAX, cpu_half_slowdown

    sc = prof.scoring
    if (device_type != "cpu" or sc.dtype in ("auto", "float32") or sc.measure != "fisher"
            or (metric or sc.metric) != "sensitivity"):
        return
    slow = cpu_half_slowdown(sc.dtype)
    if slow > HALF_SLOWDOWN_MAX:
        raise LsaqError(f"scoring dtype {sc.dtype}: this CPU multiplies {sc.dtype} matrices "
                        f"{slow:.0f}x slower than float32 (measured now: it has no {sc.dtype} "
                        "instructions), so the measurement would take many times longer; use "
                        "--fisher-dtype float32 (the CPU default)")


def _resumed_job(work: Path, progress) -> Job:
    job = Job.load(work / JOB_DIR)
    job.done = [s for s in job.done if s != "writer"]   # the manifest is always written anew
    progress(f"resuming the interrupted build in {work}: finished "
             f"{', '.join(job.done) or 'nothing yet'}")
    return job


def _drop(work: Path | None) -> None:
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


def score_for_profile(source, profile: str | Profile | None = None,
                      metric: str | None = None, progress: Progress | None = None,
                      device: str = "cpu"):
    """Scores measured as `build` would measure them with this profile (its calibration, and
    for sensitivity its quantizers); pass them to build_bundle(scores=...) to reuse them."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    ctx = BuildContext(None, Path("."), prof, QuantSettings.from_profile(prof.quantization),
                       metric or prof.scoring.metric, progress or Progress(quiet=True),
                       source=source, device=device)
    job = Job(None, {})     # nothing persisted: scoring alone, in memory
    for stage in (stages.source, stages.calibration, stages.scoring):
        job = stage.run(job, ctx)
    return ctx.scores
