"""Stage: one ONNX graph per variant and provider, reading the weight store.

First, when CUDA graphs are built, the float16 check: on calibration text, does the float16
graph stay finite, or must its residual stream stay float32? Then each plan's graphs, and the
variant entries of the manifest (what each graph reads, weighs and needs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lsaq_runtime.format import ELEM_BYTES, TABLES, kv_bytes_per_token, workspace_bytes

from ..errors import LsaqError
from ..job import BuildContext, Job
from ..model_source import ModelSpec
from ..plan import avg_bits_real, part_params
from .store import layer_params

NAME = "graph"
PROVIDER_DTYPES = {"cpu": "float32", "cuda": "float16"}


def run(job: Job, ctx: BuildContext) -> Job:
    if job.finished(NAME) and job.folder is not None:
        ctx.variants = job.outputs[NAME]["variants"]
        ctx.f16_facts = job.outputs[NAME]["float16_check"]
        return job
    residual = {"cpu": "float32", "cuda": "float16"}
    ctx.f16_facts = None
    if "cuda" in ctx.profile.build.providers:
        say = ctx.progress.stage("float16 check")
        ctx.f16_facts = unchecked_if_too_large(ctx, say) or float16_check(
            ctx.bundle_dir, ctx.source.spec, ctx.index, max_context(ctx), _check_windows(ctx), say)
        residual["cuda"] = ctx.f16_facts["residual_dtype"]
    log = ctx.progress.stage("exporting")
    ctx.variants = []
    for rank, plan in enumerate(ctx.plans):
        ctx.variants.append(variant(ctx, plan, rank, residual))
        log(_summary(ctx, ctx.variants[-1], len(ctx.plans)))
    return job.finish(NAME, {"variants": ctx.variants, "float16_check": ctx.f16_facts})


def unchecked_if_too_large(ctx: BuildContext, log) -> dict | None:
    """The check runs the whole FP16 variant in ONNX Runtime on this machine: a float32 graph
    (4 bytes a parameter, and the float16 initializers while the session is made). Where that
    cannot fit the memory available now (a 7B model on a 24 GiB workstation), the float16
    graphs keep their residual stream in float32, which never overflows where the float16
    one would, and the manifest says the check did not run. None: run the check."""
    fits, why = float32_graph_fits(ctx.params)
    if fits:
        return None
    log(f"not run: {why}; the float16 graphs keep a float32 residual stream (safe, a little "
        "slower)")
    return {"checked": False, "why": why, "residual_dtype": "float32"}


def float32_graph_fits(params: int) -> tuple[bool, str]:
    """Whether a float32 graph of the whole model (4 bytes a parameter, and the float16
    initializers while the session is made: about 6 bytes a parameter) fits 80% of the memory
    available now, and the numbers that say so. The float16 check and the quality measurement
    run such graphs."""
    from lsaq_runtime.probe import probe_host

    need = 6 * params
    free = probe_host().free_bytes   # the container's limit too, as the scoring stage checks
    return need <= 0.8 * free, (f"the float32 graph needs about {need / 2**30:.1f} GiB, "
                                f"{free / 2**30:.1f} GiB is available")


def max_context(ctx: BuildContext) -> int:
    return min(ctx.profile.build.max_context, context_limit(ctx.source.spec))


def _check_windows(ctx: BuildContext):
    if ctx.calib is not None:
        return ctx.calib.windows[:2]
    # a build that needed no calibration text (zscore): cut two windows now
    from ..calibration import load_calibration, load_tokenizer

    return load_calibration(ctx.profile.scoring.calibration or None,
                            load_tokenizer(ctx.source), 2, 128).windows


def variant(ctx: BuildContext, plan, rank: int, residual: dict) -> dict:
    """Export one plan's graphs (one per provider) and return its manifest entry."""
    from ..export_onnx import build_graph, save_graph

    spec, q, prof = ctx.source.spec, ctx.profile.quantization, ctx.profile
    accuracy = {"cpu": q.cpu_accuracy_level, "cuda": 0}
    model_facts = {"num_layers": spec.num_layers, "num_key_value_heads": spec.num_kv_heads,
                   "head_dim": spec.head_dim}
    table_prec = {t: plan.table(t, ctx.tied) for t in TABLES}
    providers, cuda_info = {}, None
    for prov in prof.build.providers:
        dtype = PROVIDER_DTYPES[prov]
        head = table_prec["lm_head"]
        if head == "fp16" and ctx.head_int8 and prov == "cpu" and ctx.quantized[plan.name]:
            head = "int8"
        graph, info = build_graph(spec, list(plan.precisions), ctx.index, dtype, max_context(ctx),
                                  name=f"{spec.name} {plan.name} {prov}",
                                  accuracy_level=accuracy[prov], lm_head=head,
                                  embed=table_prec["embed_tokens"],
                                  residual_dtype=residual[prov])
        fname = f"{plan.name}.{prov}.onnx"
        save_graph(graph, ctx.bundle_dir / fname)
        ws = workspace_model(spec, prov)
        stated = prof.deployment.context_length
        weight_files = sorted({ctx.index[k].file for k in info.referenced})
        providers[prov] = {
            "graph": fname, "files": [fname, *weight_files], "dtype": dtype,
            "accuracy_level": accuracy[prov], "lm_head": head,
            "residual_dtype": residual[prov],
            "weight_bytes": info.weight_bytes, "resident_bytes": info.resident_bytes,
            "creation_extra_bytes": info.creation_extra_bytes,
            "kv_bytes_per_token": kv_bytes_per_token(model_facts, dtype),
            "workspace": ws, "stated_context": stated,
            "workspace_bytes_at_stated_context": workspace_bytes(ws, stated),
        }
        if prov == "cuda" or cuda_info is None:
            cuda_info = info
    return {
        "name": plan.name, "rank": rank, "precisions": list(plan.precisions),
        "layer_counts": plan.counts,
        "avg_bits": round(avg_bits_real(cuda_info.decoder_linear_bytes,
                                        [layer_params(spec)] * spec.num_layers), 4),
        "avg_bits_nominal": round(plan.avg_bits_nominal(part_params(spec)), 4),
        "weight_bytes": cuda_info.weight_bytes,
        "bits_per_weight": round(8 * cuda_info.weight_bytes / ctx.params, 4),
        "tables": table_prec,
        "providers": providers,
    }


def _summary(ctx: BuildContext, v: dict, n: int) -> str:
    c, t = v["layer_counts"], v["tables"]
    return (f"{v['name']}: {c['int8']} INT8 / {c['int4']} INT4"
            + (f" / {c['mixed']} mixed" if c["mixed"] else "") + f" layers, embedding "
            f"{t['embed_tokens']}, head {t['lm_head']}, "
            f"{8 * v['weight_bytes'] / ctx.params:.2f} bits per weight ({v['rank'] + 1}/{n})")


def context_limit(spec: ModelSpec) -> int:
    """The longest context a bundle may offer: the model's maximum, or with dynamic NTK RoPE
    (which exists to stretch it) that times its factor."""
    rs = spec.rope_scaling or {}
    if rs.get("rope_type") == "dynamic":
        return int(spec.max_position_embeddings * float(rs.get("factor", 1.0)))
    return spec.max_position_embeddings


def workspace_model(spec: ModelSpec, provider: str) -> dict:
    """Activation memory of a prefill of `ctx` tokens (the worst case of a generation).

    Per token: two hidden-size rows, the MLP's gate/up rows and q/k/v live at once in the
    largest step (ONNX Runtime reuses the rest). On CPU, GroupQueryAttention allocates a
    [heads, ctx, ctx] float32 probability buffer but writes only its causal half, so half of it
    is paged in; CUDA's flash kernels keep none. Fixed: the allocator's first arena blocks and
    the logits row (40 MiB fitted on SmolLM2 by benchmarks/bench_memory.py; cuBLAS workspace
    on CUDA is an assumption, not measured here)."""
    elem = ELEM_BYTES[PROVIDER_DTYPES[provider]]
    h, i = spec.hidden_size, spec.intermediate_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    per_token = elem * (2 * h + 2 * i + qkv)
    sq = 2 * spec.num_heads if provider == "cpu" else 0
    # the logits row and the sampler's float64 temporaries over the vocabulary (32 bytes a
    # token: 8 MiB at 262k)
    fixed = 32 * spec.vocab_size + (40 << 20 if provider == "cpu" else 64 << 20)
    return {"fixed_bytes": fixed, "per_token_bytes": per_token, "per_token_sq_bytes": sq}


def float16_check(root: Path, spec: ModelSpec, index: dict, max_context: int, windows,
                  log=None) -> dict:
    """Does the float16 (CUDA) graph stay finite on calibration text? Runs the FP16 variant's
    float16 graph on ONNX Runtime's CPU provider (the values overflow, not the kernel, so the
    CPU shows what a GPU would compute) on `windows`, framed as prompts (BOS first: a real
    Gemma 3's residual reaches |h| = 103,795 at BOS, past float16's 65,504). Where its logits
    are not finite the float16 graphs keep their residual stream and norms in float32, and the
    check runs again on that graph. Returns the residual dtype to build the float16 graphs with
    and what was measured (KL of the float16 graph from the float32 one, per token)."""
    from lsaq_runtime.session import Runner, create_session

    from ..evaluate import _log_softmax
    from ..export_onnx import build_graph

    model = {"num_layers": spec.num_layers, "num_key_value_heads": spec.num_kv_heads,
             "head_dim": spec.head_dim, "vocab_size": spec.vocab_size}
    seq = int(windows.shape[1])

    def logits(dtype: str, residual: str | None = None) -> list[np.ndarray]:
        graph, _ = build_graph(spec, ["fp16"] * spec.num_layers, index, dtype,
                               min(max_context, seq), residual_dtype=residual)
        session = create_session(root / "float16-check.onnx", "cpu",
                                 data=graph.SerializeToString())
        runner = Runner(session, {"model": model}, dtype, seq, "cpu")
        try:
            return [runner.run([int(t) for t in w], 0, seq).copy() for w in windows]
        finally:
            runner.close()

    ref = logits("float32")
    facts = {"windows": int(len(windows)), "seq_len": seq}
    for residual in ("float16", "float32"):
        got = logits("float16", residual)
        finite = all(np.isfinite(x).all() for x in got)
        facts[f"finite_with_{residual}_residual"] = bool(finite)
        if finite:
            kl = 0.0
            for r, x in zip(ref, got):
                lr = _log_softmax(r)   # the reference's, once a window
                kl += float((np.exp(lr) * (lr - _log_softmax(x))).sum())
            kl /= len(got) * seq
            facts.update(residual_dtype=residual, kl_vs_float32=round(kl, 6))
            if log:
                log(f"float16 graph finite with a {residual} residual stream on {len(windows)} "
                    f"calibration windows; KL from the float32 graph {kl:.2e} per token")
            return facts
        if log:
            log(f"the float16 graph overflows on calibration text with a {residual} residual "
                "stream" + ("; keeping the residual stream and norms in float32" if
                            residual == "float16" else ""))
    raise LsaqError("the float16 (CUDA) graph gives non-finite logits on calibration text even "
                    "with a float32 residual stream (a matmul's own output passes 65,504); build "
                    "without CUDA graphs: build.providers = [\"cpu\"] in a profile")
