"""Stage: quantize every tensor the plans need and stream it into the bundle's weight store
(weights/*.safetensors, export_onnx.write_weight_store), one decoder layer at a time."""

from __future__ import annotations

import json

from lsaq_runtime.format import layer_linear_params
from lsaq_runtime.format import parameter_count as _parameter_count

from ..job import CANDIDATES, BuildContext, Job, write_json_atomic
from ..store import TensorRef

NAME = "store"
INDEX = "store_index.json"


def run(job: Job, ctx: BuildContext) -> Job:
    from ..export_onnx import QKV_BIAS_KEY, write_weight_store

    if job.finished(NAME) and job.folder is not None and job.path(INDEX).is_file():
        rec = json.loads(job.path(INDEX).read_text(encoding="utf-8"))
        ctx.index = {k: TensorRef(r["file"], r["offset"], r["length"], r["dtype"],
                                  tuple(r["shape"])) for k, r in rec.items()}
        ctx.progress("quantizing: reusing the weight store the interrupted build wrote")
    else:
        ctx.index = write_weight_store(ctx.source, ctx.bundle_dir, ctx.needed, ctx.schemes,
                                       progress=ctx.progress.stage("quantizing"),
                                       head_int8=ctx.head_int8, act_stats=ctx.act_stats,
                                       table_precisions=ctx.table_needed,
                                       candidates=_candidates(job))
        if job.folder is not None:
            write_json_atomic(job.path(INDEX), {k: {"file": r.file, "offset": r.offset,
                                                    "length": r.length, "dtype": r.dtype,
                                                    "shape": list(r.shape)}
                                                for k, r in ctx.index.items()})
    ctx.params = parameter_count(ctx.source.spec, ctx.tied,
                                 any(k.endswith(QKV_BIAS_KEY) for k in ctx.index))
    return job.finish(NAME, {"index": INDEX, "num_parameters": ctx.params})


def _candidates(job: Job):
    """The folder where this build's fisher estimate kept its quantized linears, if any."""
    folder = job.path(CANDIDATES) if job.folder is not None else None
    return folder if folder is not None and folder.is_dir() else None


def _shape(spec) -> dict[str, int]:
    return {"hidden": spec.hidden_size, "heads": spec.num_heads, "kv_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "intermediate": spec.intermediate_size}


def layer_params(spec) -> int:
    """Weights in one decoder layer's seven linear projections."""
    return layer_linear_params(**_shape(spec))


def parameter_count(spec, tied: bool, qkv_bias: bool = False) -> int:
    """Weights of the whole model: decoder linears, token tables, norms (and q/k/v biases)."""
    return _parameter_count(spec.num_layers, **_shape(spec), vocab=spec.vocab_size, tied=tied,
                            sandwich_norms=spec.family.sandwich_norms,
                            qk_norm=spec.family.qk_norm, qkv_bias=qkv_bias)
