"""Stage: the bundle writer. The manifest is a pure function of what the stages produced
(`manifest`, `with_quality`: no I/O, tested as such); `run` hashes the files, measures each
variant's quality on held-out windows (its CPU graph through the runtime, or its stored
weights streamed through torch: stream_quality.py), checks the result against the runtime's
schema and writes manifest.json last: a folder with a manifest is complete."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
from lsaq_runtime.format import MANIFEST, SCHEMA_VERSION
from lsaq_runtime.integrity import sha256_files

from ..errors import LsaqError
from ..job import JOB_DIR, BuildContext, Job
from ..profiles import parse_size

NAME = "writer"


def run(job: Job, ctx: BuildContext) -> Job:
    from ..export_onnx import rope_for, table_scheme

    spec, source, root = ctx.source.spec, ctx.source, ctx.bundle_dir
    from .graph import max_context

    m = manifest(
        spec, {"kind": source.kind, "path": str(source.path), "sha256": source.fingerprint()},
        ctx.profile, ctx.variants, files=[],
        tokenizer=ctx.tokenizer, scores=scores_record(ctx.scores, ctx.additive),
        schemes={p: ctx.schemes[p].name for p in ("int8", "int4")},
        table_schemes={p: table_scheme(ctx.schemes, p).name for p in ("int8", "int4")},
        max_context=max_context(ctx), num_parameters=ctx.params,
        rope_switch=rope_for(spec).switch, clip_calibration=ctx.act_calib,
        float16_check=ctx.f16_facts)
    ctx.progress("checksums: hashing bundle files")
    m["files"] = file_entries(root)
    _write(root, m)
    if ctx.held_out is not None:
        # Each variant on held-out calibration windows (the bundle is complete but still in
        # its working folder): its CPU graph through the runtime, or streamed through torch
        # from the same stored weights where the graphs cannot fit; then rank by it.
        log = ctx.progress.stage("quality")
        engine = quality_engine(ctx.profile.build.quality_engine, ctx.params, log)
        if engine == "graphs":
            held = ctx.held_out
            quality = measure_quality(root, m, held, log)
        else:
            from ..stream_quality import streamed_quality

            held = streamed_windows(ctx.held_out, ctx.profile.build.streamed_quality_samples, log)
            quality = streamed_quality(root, held, source, log, device=ctx.device)
        m = with_quality(m, quality, ctx.plan_kl, ctx.calib, held.shape, engine)
        _write(root, m)
    ctx.manifest = m
    return job.finish(NAME, {"manifest": MANIFEST})


def _write(root: Path, m: dict) -> None:
    from lsaq_runtime.manifest import validate_manifest

    validate_manifest(m)   # the runtime owns the contract
    (root / MANIFEST).write_text(json.dumps(m, indent=1))


def manifest(spec, source: dict, profile, variants: list[dict], files: list[dict], *,
             tokenizer: dict, scores: dict, schemes: dict[str, str],
             table_schemes: dict[str, str], max_context: int, num_parameters: int,
             rope_switch: int | None = None, clip_calibration: dict | None = None,
             float16_check: dict | None = None) -> dict:
    """The manifest of a bundle, from the model's spec and source facts (kind, path, sha256),
    the profile, the variant entries (graph stage), the file list, the tokenizer facts, the
    scores record and the INT8/INT4 scheme names. No I/O: equal inputs, equal manifest."""
    from .. import __version__

    q, d = profile.quantization, profile.deployment
    return {
        "format": "lsaq-bundle", "schema_version": SCHEMA_VERSION,
        "created_by": f"lsaq-compile {__version__}",
        "model": {
            "name": spec.name, "architecture": spec.architecture, "source": dict(source),
            "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
            "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_position_embeddings,
            "max_context": max_context, "tie_word_embeddings": spec.tie_word_embeddings,
            "num_parameters": num_parameters,
            # longrope: the runtime rebuilds the cache past it
            **({"rope_switch_length": rope_switch}
               if rope_switch and rope_switch < max_context else {}),
        },
        "tokenizer": {"dir": "tokenizer", **tokenizer},
        "scores": scores,
        "quantization": {
            "scheme": q.scheme, "symmetric": q.symmetric,
            "group_size": q.group_size if q.scheme == "group" else None,
            "int8": schemes["int8"], "int4": schemes["int4"],
            "block_size": q.block_size or None, "cpu_accuracy_level": q.cpu_accuracy_level,
            "cpu_lm_head": q.cpu_lm_head, "clip": q.clip, "clip_calibration": clip_calibration,
            "tables": q.tables if profile.tables_on_ladder else "fp16",
            "table_schemes": dict(table_schemes),
        },
        "deployment": {
            "profile": profile.name,
            "context_length": d.context_length, "batch_size": d.batch_size,
            "safety_margin": {"fraction": d.safety_margin_fraction,
                              "min_bytes": parse_size(d.safety_margin_min)},
            "runtime_overhead_bytes": {"cpu": parse_size(d.runtime_overhead_cpu),
                                       "cuda": parse_size(d.runtime_overhead_cuda)},
        },
        "variants": [dict(v) for v in variants],
        **({"build_checks": {"float16": float16_check}} if float16_check else {}),
        "files": list(files),
    }


def scores_record(scores, additive: dict) -> dict:
    rec = scores.to_json()
    if additive:
        rec["params"] = {**rec["params"], "additive_fit": additive}
    return rec


def file_entries(root: Path) -> list[dict]:
    files = [p for p in sorted(root.rglob("*"))
             if p.is_file() and p.name != MANIFEST and JOB_DIR not in p.relative_to(root).parts]
    return [{"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(files, sha256_files(files))]


# deployment.quality.engine, and what each measured
ENGINE_NAMES = {"graphs": "onnxruntime-cpu-graphs", "streamed": "torch-streamed"}
ENGINE_WHAT = {
    "graphs": "each variant's CPU graph on held-out calibration windows: KL from the FP16 "
              "variant's CPU graph (ranks the variants) and perplexity",
    "streamed": "each variant's stored weights, dequantized (those its CPU graph reads, the "
                "head included), in a float32 torch pass one decoder layer at a time (float "
                "activations, where the CPU kernels at accuracy level 4 quantize them to int8) "
                "on held-out calibration windows: KL from the FP16 variant (ranks the "
                "variants) and perplexity",
}


def quality_engine(setting: str, params: int, log) -> str:
    """graphs or streamed, from the profile's build.quality_engine: auto runs the graphs where
    the FP16 variant's float32 graph fits the memory available (the float16 check's bound),
    else streams; the build log says which and why."""
    from .graph import float32_graph_fits

    if setting != "auto":
        log(f"engine {setting} (build.quality_engine)")
        return setting
    fits, why = float32_graph_fits(params)
    engine = "graphs" if fits else "streamed"
    log(f"engine {engine}: {why}" + ("" if fits else "; streamed through torch one decoder "
                                     "layer at a time from the stored weights"))
    return engine


def streamed_windows(held_out, n: int, log):
    """The first `n` held-out windows (0: all) for the streamed engine, where every window costs
    each variant a pass of the whole model; the log says how many of how many."""
    if not n or n >= len(held_out):
        return held_out
    log(f"{n} of the {len(held_out)} held-out windows (build.streamed_quality_samples): each "
        "costs every variant a pass of the whole model")
    return held_out[:n]


def with_quality(m: dict, quality: dict[str, dict], plan_kl: dict[str, float], calib,
                 shape: tuple[int, int], engine: str = "graphs") -> dict:
    """The manifest with each variant's measured quality (and the torch KL of its plan on the
    calibration windows), ranked by KL from FP16 (deployment.rank_by = kl_fp16): paired
    against the same reference it is far less noisy than a perplexity difference, and unlike
    perplexity it cannot improve under quantization noise (docs/results/ranking.md). The
    runtime's rule that a variant never ranks above one at least as precise in every part
    applies on top. No I/O."""
    from lsaq_runtime.planner import quality_order

    n, seq = shape
    variants = []
    for v in m["variants"]:
        q = dict(quality[v["name"]])
        if v["name"] in plan_kl:
            q["kl"] = round(plan_kl[v["name"]], 6)
        variants.append({**v, "quality": q})
    variants = [{**v, "rank": rank} for rank, v in enumerate(quality_order(variants, "kl_fp16"))]
    deployment = {**m["deployment"], "rank_by": "kl_fp16", "quality": {
        "what": ENGINE_WHAT[engine], "engine": ENGINE_NAMES[engine],
        "source": calib.source, "windows": int(n), "seq_len": int(seq),
        "prefix": list(calib.prefix)}}
    return {**m, "deployment": deployment, "variants": variants}


def measure_quality(root: Path, m: dict, windows, log) -> dict[str, dict]:
    """Quality of every variant's CPU graph on held-out calibration windows (each framed as the
    model frames a prompt): its perplexity and its KL from the FP16 variant's graph on the same
    tokens, by variant name."""
    import tempfile

    from ..evaluate import log_softmax_rows, onnx_logits_fn

    n, seq = windows.shape
    t0 = time.perf_counter()
    variants = sorted(m["variants"], key=lambda v: v["name"] != "fp16")  # FP16 first
    if variants[0]["name"] != "fp16":
        raise LsaqError("quality ranking needs the fp16 variant as the reference")
    out = {}
    # In the build's job folder where there is one: a build killed here (SIGKILL, out of
    # memory) leaves it where the next build of the bundle cleans up or --resume drops it,
    # not gigabytes in the system's temporary folder.
    job = root / JOB_DIR
    with tempfile.TemporaryDirectory(prefix="lsaq-quality-",
                                     dir=job if job.is_dir() else None) as work:
        # The reference distributions for every held-out position, on disk: vocabulary x
        # positions can reach gigabytes (262k x 2k x 4 bytes for Gemma 3).
        ref = np.lib.format.open_memmap(Path(work) / "fp16.npy", "w+", np.float32,
                                        (n, seq - 1, m["model"]["vocab_size"]))
        for v in variants:
            fn = onnx_logits_fn(root, m, v["name"], context=seq)
            nll = kl = 0.0
            for w in range(n):
                target = windows[w, 1:]
                picked = np.empty(seq - 1)    # log p(target), summed at once as before
                # by evaluate.LSM_ROWS rows: bounded temporaries at any vocabulary
                for a, lp in log_softmax_rows(fn(windows[w])[:-1]):
                    picked[a:a + len(lp)] = lp[np.arange(len(lp)), target[a:a + len(lp)]]
                    if v["name"] == "fp16":
                        ref[w, a:a + len(lp)] = lp
                    else:
                        r = ref[w, a:a + len(lp)].astype(np.float64)
                        kl += float((np.exp(r) * (r - lp)).sum())
                nll -= float(picked.sum())
            fn.close()
            tokens = n * (seq - 1)
            out[v["name"]] = {"perplexity": round(math.exp(nll / tokens), 4), "tokens": tokens,
                              "kl_fp16": round(kl / tokens, 6)}
            log(f"{v['name']}: KL from FP16 {kl / tokens:.5f}, perplexity "
                f"{math.exp(nll / tokens):.3f} on {n} held-out windows "
                f"({time.perf_counter() - t0:.0f}s)")
        del ref
    return out
