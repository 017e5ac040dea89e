"""Stage: which tensors the plans need at which precision (what the store stage writes).

Decided from the plans alone, so it runs again on a resumed build (it costs nothing)."""

from __future__ import annotations

from lsaq_runtime.format import TABLES

from ..job import BuildContext, Job

NAME = "quantize"


def run(job: Job, ctx: BuildContext) -> Job:
    from ..export_onnx import LM_HEAD

    plans, spec, q = ctx.plans, ctx.source.spec, ctx.profile.quantization
    ctx.needed = {i: {p.precisions[i] for p in plans} for i in range(spec.num_layers)}
    ctx.tied = tied = spec.tie_word_embeddings or not ctx.source.has_tensor(LM_HEAD)
    tables = ("embed_tokens",) if tied else TABLES
    ctx.table_needed = {t: {p.table(t, tied) for p in plans} for t in tables}
    # The CPU graphs of quantized variants may read an INT8 copy of an fp16 LM head: on CPU
    # the float head is held as float32 (4 bytes a weight) and is a quarter of int4 decode
    # time.
    ctx.quantized = {p.name: not {"fp16", "fp32"} & set(p.precisions) for p in plans}
    ctx.head_int8 = q.cpu_lm_head == "int8" and "cpu" in ctx.profile.build.providers and \
        any(ctx.quantized[p.name] and p.table("lm_head", tied) == "fp16" for p in plans)
    return job.finish(NAME, {"head_int8": ctx.head_int8, "tied": tied})
