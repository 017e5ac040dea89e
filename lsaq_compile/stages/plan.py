"""Stage: the ladder, one precision plan per variant, most precise first.

Sensitivity scores are allocated by bytes (ladders 'bytes' and 'paper', sensitivity.py);
every other order makes the paper's mixes (plan.ladder). The kind was checked once, with
the profile (plan.check_ladder); here only against the metric of the scores actually used.
"""

from __future__ import annotations

from ..errors import LsaqError
from ..job import CANDIDATES, PLAN_STATES, BuildContext, Job, write_json_atomic
from ..plan import Plan, check_ladder, ladder

NAME = "plan"
PLANS = "plans.json"


def run(job: Job, ctx: BuildContext) -> Job:
    import json

    if job.finished(NAME) and job.folder is not None:
        rec = json.loads(job.path(PLANS).read_text(encoding="utf-8"))
        ctx.plans, ctx.plan_kl, ctx.additive = from_json(rec)
        return job
    ctx.plans, ctx.plan_kl, ctx.additive = plans(ctx, job)
    ctx.meter = None   # its cached activations and weights are not needed past planning
    if job.folder is not None:
        write_json_atomic(job.path(PLANS), to_json(ctx.plans, ctx.plan_kl, ctx.additive))
    return job.finish(NAME, {"plans": PLANS, "variants": [p.name for p in ctx.plans]})


def plans(ctx: BuildContext, job: Job | None = None) -> tuple[list[Plan], dict[str, float], dict]:
    """(plans most precise first, measured KL per plan, additive fit)."""
    from .. import sensitivity

    sc, prof = ctx.scores, ctx.profile
    kind = prof.build.ladder
    check_ladder(kind, sc.metric)
    if sc.metric != "sensitivity" or kind == "full":
        return ladder(list(sc.order), kind), {}, {}
    sens = sensitivity.from_scores(sc, ctx.schemes)
    want = sensitivity.GRANULARITY[prof.scoring.granularity]
    if sens.units != want:
        raise LsaqError(f"these sensitivity scores measured {'/'.join(sens.units)}, but the "
                        f"profile allocates {'/'.join(want)} (scoring.granularity "
                        f"{prof.scoring.granularity!r}); score again with this profile")
    meter = ctx.meter
    if meter is None and prof.scoring.measure == "fisher":
        # whole plans measured exactly, streamed: every plan of a refinement round in one pass
        from ..estimate import StreamMeter
        from ..progress import throttled

        say = ctx.progress.stage("allocating")
        in_job = job is not None and job.folder is not None
        meter = StreamMeter(ctx.source, ctx.calib.windows, ctx.schemes, ctx.act_stats,
                            device=ctx.device, dtype=ctx.dtype, progress=throttled(say),
                            candidates=job.path(CANDIDATES) if in_job else None,
                            states=job.path(PLAN_STATES) if in_job else None)
        found = _ladder(ctx, meter, sens, kind)
        meter.close()   # its kept states: not needed past planning (a killed build keeps them)
        return found
    elif meter is None:  # reused scores: the plans are still validated on this build's windows
        from .scoring import check_memory

        check_memory(ctx, ctx.progress.stage("allocating"))   # the meter holds the whole model
        meter = sensitivity.KLMeter(ctx.source, ctx.calib.windows, ctx.schemes, ctx.act_stats,
                                    device=ctx.device)
    return _ladder(ctx, meter, sens, kind)


def _ladder(ctx: BuildContext, meter, sens, kind: str):
    from .. import sensitivity

    prof = ctx.profile
    return sensitivity.ladder_plans(meter, sens, ctx.schemes, kind, prof.build.rungs,
                                    prof.build.refine, ctx.progress.stage("allocating"),
                                    prof.build.rung_bits, tables=prof.tables_on_ladder)


def to_json(plans: list[Plan], kl: dict, additive: dict) -> dict:
    return {"plans": [{"name": p.name, "precisions": list(p.precisions),
                       "tables": [list(t) for t in p.tables]} for p in plans],
            "kl": kl, "additive": additive}


def from_json(rec: dict) -> tuple[list[Plan], dict[str, float], dict]:
    plans = [Plan(p["name"], tuple(p["precisions"]), tuple(tuple(t) for t in p["tables"]))
             for p in rec["plans"]]
    return plans, dict(rec["kl"]), dict(rec["additive"])
