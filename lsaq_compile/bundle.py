"""Stage 5: assemble the bundle — weight store, one graph per variant and provider, manifest.

Everything is written into a temporary folder beside the target and renamed at the end, and the
manifest is the last file written: a folder with a manifest at the target path is complete.
Scores are measured once and reused for every variant (exllamav2's measure-once idea).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.manifest import (ELEM_BYTES, MANIFEST, SCHEMA_VERSION, SWAP_JOURNAL, TABLES,
                                   kv_bytes_per_token, replace_refusal, sha256_file,
                                   verify_bundle, workspace_bytes)

from . import __version__
from .errors import LsaqError
from .model_source import ModelSource, ModelSpec, open_model
from .plan import avg_bits_real, ladder, part_params
from .profiles import Profile, load_profile, parse_size
from .progress import Progress
from .quantize import schemes_for

PROVIDER_DTYPES = {"cpu": "float32", "cuda": "float16"}
TMP_MARK = ".lsaq-tmp-"


def context_limit(spec: ModelSpec) -> int:
    """The longest context a bundle may offer: the model's maximum, or with dynamic NTK RoPE
    (which exists to stretch it) that times its factor."""
    rs = spec.rope_scaling or {}
    if rs.get("rope_type") == "dynamic":
        return int(spec.max_position_embeddings * float(rs.get("factor", 1.0)))
    return spec.max_position_embeddings


def layer_params(spec: ModelSpec) -> int:
    """Weights in one decoder layer's seven linear projections."""
    h, hd = spec.hidden_size, spec.head_dim
    attn = h * spec.num_heads * hd * 2 + h * spec.num_kv_heads * hd * 2
    return attn + 3 * h * spec.intermediate_size


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


def _calibration(source: ModelSource, profile: Profile, metric: str):
    """(scoring calibration, held-out windows): scoring.samples windows of the calibration text
    and build.quality_samples more from the gaps between them, for measuring each variant's
    quality. (None, None) when nothing needs text."""
    from .calibration import load_calibration, load_tokenizer

    sc, held = profile.scoring, profile.build.quality_samples
    if metric == "zscore" and not held and profile.quantization.clip != "mse-act":
        return None, None
    calib = load_calibration(sc.calibration or None, load_tokenizer(source), samples=sc.samples,
                             seq_len=sc.seq_len, held_out=held)
    return calib, calib.held_out


def _activation_stats(source: ModelSource, profile: Profile, calib, progress):
    """(stats, calibration facts) for clip 'mse-act', measured on the scoring calibration
    windows; (None, None) for the other clips, which need no activations."""
    if profile.quantization.clip != "mse-act":
        return None, None
    from .activations import activation_stats, windows_fingerprint

    log = progress.stage("activations")
    stats = activation_stats(source, calib.windows,
                             progress=lambda i, n, s: log(f"layer {i + 1}/{n} ({s:.1f}s)"))
    return stats, {"source": calib.source, "sha256": calib.sha256, "samples": calib.samples,
                   "seq_len": calib.seq_len, "windows_sha256": windows_fingerprint(calib.windows)}


def _load_scores(scores, source: ModelSource, profile: Profile, metric: str, progress, calib,
                 schemes, act_stats):
    """(Scores, KLMeter or None) from a scores.json path, a Scores object, or measured now."""
    from .importance import Scores, score_model
    from . import sensitivity

    L = source.spec.num_layers
    if scores is None:
        sc = profile.scoring
        log = progress.stage("scoring")
        if metric == "sensitivity":
            return sensitivity.score(source, calib, calib.windows, schemes, act_stats, log,
                                     granularity=sc.granularity, tables=tables_on_ladder(profile))
        result = score_model(source, metrics=(metric,), k=sc.k, final_norm=sc.final_norm,
                             calibration=calib if metric != "zscore" else None,
                             progress=lambda i, n, s: log(f"layer {i + 1}/{n} ({s:.1f}s)"))
        return result[metric], None
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
    if len(scores.importance) != L:
        raise LsaqError(f"scores cover {len(scores.importance)} layers but the model has {L}; "
                        "score this model again")
    return scores, None


def _plans(sc, meter, source: ModelSource, profile: Profile, schemes, calib, act_stats, progress):
    """(plans most precise first, measured KL per plan, additive fit). Sensitivity scores are
    allocated by bytes (ladders 'bytes' and 'paper'); every other order makes the paper's mixes."""
    from . import sensitivity

    kind = profile.build.ladder
    if sc.metric != "sensitivity" or kind == "full":
        if kind == "bytes":
            raise LsaqError(f"build.ladder 'bytes' allocates by measured sensitivity, but the "
                            f"scores are {sc.metric}; use --metric sensitivity or a profile with "
                            "ladder 'full' or 'paper'")
        return ladder(list(sc.order), kind), {}, {}
    sens = sensitivity.from_scores(sc, schemes)
    want = sensitivity.GRANULARITY[profile.scoring.granularity]
    if sens.units != want:
        raise LsaqError(f"these sensitivity scores measured {'/'.join(sens.units)}, but the "
                        f"profile allocates {'/'.join(want)} (scoring.granularity "
                        f"{profile.scoring.granularity!r}); score again with this profile")
    if meter is None:  # reused scores: the plans are still validated on this build's windows
        meter = sensitivity.KLMeter(source, calib.windows, schemes, act_stats)
    return sensitivity.ladder_plans(meter, sens, schemes, kind, profile.build.rungs,
                                    profile.build.refine, progress.stage("allocating"),
                                    profile.build.rung_bits, tables=tables_on_ladder(profile))


def tables_on_ladder(profile: Profile) -> bool:
    """Whether the embedding table and LM head get INT8/INT4 by measured sensitivity: the
    profile asks for it and allocates by bytes (the other ladders keep the paper's fp16 tables)."""
    return profile.quantization.tables == "ladder" and profile.build.ladder == "bytes"


def parameter_count(spec: ModelSpec, tied: bool, qkv_bias: bool = False) -> int:
    """Weights of the whole model: decoder linears, token tables, norms (and q/k/v biases)."""
    h, hd = spec.hidden_size, spec.head_dim
    norms = (4 if spec.family.sandwich_norms else 2) * h + \
        (2 * hd if spec.family.qk_norm else 0) + \
        ((spec.num_heads + 2 * spec.num_kv_heads) * hd if qkv_bias else 0)
    return (spec.num_layers * (layer_params(spec) + norms) + h
            + (1 if tied else 2) * spec.vocab_size * h)


def score_for_profile(source: ModelSource, profile: str | Profile | None = None,
                      metric: str | None = None, progress: Progress | None = None):
    """Scores measured as `build` would measure them with this profile (its calibration, and
    for sensitivity its quantizers); pass them to build_bundle(scores=...) to reuse them."""
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    progress = progress or Progress(quiet=True)
    q = prof.quantization
    schemes = schemes_for(q.scheme, q.group_size, q.symmetric, q.block_size or None, q.clip)
    metric = metric or prof.scoring.metric
    calib, _ = _calibration(source, prof, metric)
    act_stats, _ = _activation_stats(source, prof, calib, progress)
    return _load_scores(None, source, prof, metric, progress, calib, schemes, act_stats)[0]


def _file_entries(root: Path) -> list[dict]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append({"path": p.relative_to(root).as_posix(), "bytes": p.stat().st_size,
                        "sha256": sha256_file(p)})
    return out


def _tmp_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}{TMP_MARK}{os.getpid()}"


def _clean_stale_tmp(out: Path) -> None:
    """Remove temporary folders of earlier builds of this target that died midway (after
    _recover_swap: a finished bundle an interrupted swap left hidden is put in place first)."""
    for p in out.parent.glob(f".{out.name}{TMP_MARK}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


OLD_MARK = ".lsaq-old-"


def _journal(out: Path) -> Path:
    return out.parent / SWAP_JOURNAL.format(name=out.name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: Path, out: Path, force: bool) -> None:
    """Put the finished bundle `tmp` at `out`, replacing the bundle there (checked again: it may
    have changed during the build). Two renames cannot be one atomic step, so a journal beside
    `out` names both folders first; a build that dies between the renames leaves the journal,
    and the next build of `out` (_recover_swap) finishes the swap or puts the old bundle back.
    The old bundle is deleted only once the new one is in place, then the journal."""
    if not (out.exists() or out.is_symlink()):
        tmp.rename(out)
        return
    check_replaceable(out, force)
    trash = out.parent / f".{out.name}{OLD_MARK}{os.getpid()}"
    journal = _journal(out)
    part = journal.with_name(journal.name + ".part")
    part.write_text(json.dumps({"target": out.name, "old": trash.name, "new": tmp.name,
                                "pid": os.getpid()}))
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    part.rename(journal)
    _fsync_dir(out.parent)
    out.rename(trash)
    try:
        tmp.rename(out)
    except BaseException:  # an error (not a crash) between the renames: put the old one back
        trash.rename(out)
        journal.unlink()
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(trash, ignore_errors=True)
    journal.unlink()


def _recover_swap(out: Path, progress=None) -> None:
    """Finish or undo the swap of an earlier build of `out` that died midway (its journal says
    which folders): when `out` is missing and the new bundle it names passes the full check, it
    is put in place (the build had finished); otherwise the old bundle goes back. Nothing is
    deleted until a bundle stands at `out` again."""
    journal = _journal(out)
    if not journal.is_file():
        return
    try:
        j = json.loads(journal.read_text(encoding="utf-8"))
        old, new, pid = j["old"], j["new"], int(j["pid"])
        for name, mark in ((old, OLD_MARK), (new, TMP_MARK)):
            if not (isinstance(name, str) and "/" not in name and "\\" not in name
                    and name.startswith(f".{out.name}{mark}")):
                raise ValueError(name)
    except (OSError, ValueError, KeyError, TypeError):
        raise LsaqError(f"{journal}: an interrupted build left this swap journal, but it cannot "
                        "be read; look at the hidden folders beside it, put the bundle you want "
                        "back by hand, then delete the journal") from None
    if pid != os.getpid() and _pid_alive(pid):
        raise LsaqError(f"{out}: another build (pid {pid}) is replacing it right now; wait for "
                        "it to finish")
    old, new = out.parent / old, out.parent / new
    say = progress or (lambda msg: None)
    if not (out.exists() or out.is_symlink()):
        if new.is_dir() and _finished(new):
            new.rename(out)
            say(f"recovered {out}: an interrupted build had finished it; the swap is complete")
        elif old.is_dir():
            old.rename(out)
            say(f"recovered {out}: put back the bundle an interrupted build had moved aside")
        _fsync_dir(out.parent)
    if out.exists() and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        journal.unlink()


def _finished(folder: Path) -> bool:
    """A complete bundle: it passes the runtime's full check."""
    try:
        return not verify_bundle(folder)
    except LsaqRuntimeError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_bundle(model: str | os.PathLike | None = None, out: str | os.PathLike = "bundle",
                 profile: str | Profile | None = None, scores=None, metric: str | None = None,
                 force: bool = False, progress: Progress | None = None,
                 chat_template: str | None = None) -> Path:
    """Compile `model` (None = the default SmolLM2) into a bundle folder at `out`.
    chat_template: a Jinja template to ship instead of the source's (many GGUFs carry none)."""
    from .export_onnx import (LM_HEAD, QKV_BIAS_KEY, build_graph, rope_for, save_graph,
                              table_scheme, write_weight_store)

    progress = progress or Progress()
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    # Absolute: `-o .` names the folder by its own name, so the temporary folder goes beside
    # it, not inside it.
    out = Path(os.path.abspath(out))
    _recover_swap(out, progress)
    check_replaceable(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LsaqError(f"{out.parent}: cannot create the output folder ({e.strerror})") from None
    _clean_stale_tmp(out)

    t0 = time.perf_counter()
    source = open_model(model)
    spec = source.spec
    progress(f"model: {spec.name} ({spec.architecture}, {spec.num_layers} layers, "
             f"hidden {spec.hidden_size}) from {source.path}")
    q = prof.quantization
    schemes = schemes_for(q.scheme, q.group_size, q.symmetric, q.block_size or None, q.clip)
    metric = metric or prof.scoring.metric
    calib, held_out = _calibration(source, prof, metric)
    act_stats, act_calib = _activation_stats(source, prof, calib, progress)
    sc, meter = _load_scores(scores, source, prof, metric, progress, calib, schemes, act_stats)
    plans, plan_kl, additive = _plans(sc, meter, source, prof, schemes, calib, act_stats, progress)
    del meter  # its cached activations and weights are not needed past planning
    accuracy = {"cpu": q.cpu_accuracy_level, "cuda": 0}
    max_context = min(prof.build.max_context, context_limit(spec))
    switch = rope_for(spec).switch   # longrope: the runtime rebuilds the cache past it

    tmp = _tmp_dir_for(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as e:
        raise LsaqError(f"{out.parent}: cannot write there ({e.strerror}); choose another -o") from None
    try:
        tok = source.save_tokenizer(tmp / "tokenizer")
        if chat_template is not None:
            tok["chat_template"] = chat_template
        needed = {i: {p.precisions[i] for p in plans} for i in range(spec.num_layers)}
        tied = spec.tie_word_embeddings or not source.has_tensor(LM_HEAD)
        tables = ("embed_tokens",) if tied else TABLES
        table_needed = {t: {p.table(t, tied) for p in plans} for t in tables}
        # The CPU graphs of quantized variants may read an INT8 copy of an fp16 LM head: on CPU
        # the float head is held as float32 (4 bytes a weight) and is a quarter of int4 decode
        # time.
        quantized = {p.name: not {"fp16", "fp32"} & set(p.precisions) for p in plans}
        head_int8 = q.cpu_lm_head == "int8" and "cpu" in prof.build.providers and \
            any(quantized[p.name] and p.table("lm_head", tied) == "fp16" for p in plans)
        index = write_weight_store(source, tmp, needed, schemes, progress=progress.stage("quantizing"),
                                   head_int8=head_int8, act_stats=act_stats,
                                   table_precisions=table_needed)
        params = parameter_count(spec, tied, any(k.endswith(QKV_BIAS_KEY) for k in index))

        residual = {"cpu": "float32", "cuda": "float16"}
        f16_facts = None
        if "cuda" in prof.build.providers:
            if calib is not None:
                check_windows = calib.windows[:2]
            else:   # a build that needed no calibration text (zscore): cut two windows now
                from .calibration import load_calibration, load_tokenizer

                check_windows = load_calibration(prof.scoring.calibration or None,
                                                 load_tokenizer(source), 2, 128).windows
            f16_facts = float16_check(tmp, spec, index, max_context, check_windows,
                                      progress.stage("float16 check"))
            residual["cuda"] = f16_facts["residual_dtype"]
        log = progress.stage("exporting")
        per_layer = layer_params(spec)
        model_facts = {"num_layers": spec.num_layers, "num_key_value_heads": spec.num_kv_heads,
                       "head_dim": spec.head_dim}
        variants = []
        for rank, plan in enumerate(plans):
            providers = {}
            cuda_info = None
            table_prec = {t: plan.table(t, tied) for t in TABLES}
            for prov in prof.build.providers:
                dtype = PROVIDER_DTYPES[prov]
                head = table_prec["lm_head"]
                if head == "fp16" and head_int8 and prov == "cpu" and quantized[plan.name]:
                    head = "int8"
                graph, info = build_graph(spec, list(plan.precisions), index, dtype, max_context,
                                          name=f"{spec.name} {plan.name} {prov}",
                                          accuracy_level=accuracy[prov], lm_head=head,
                                          embed=table_prec["embed_tokens"],
                                          residual_dtype=residual[prov])
                fname = f"{plan.name}.{prov}.onnx"
                save_graph(graph, tmp / fname)
                ws = workspace_model(spec, prov)
                ctx = prof.deployment.context_length
                weight_files = sorted({index[k].file for k in info.referenced})
                providers[prov] = {
                    "graph": fname, "files": [fname, *weight_files], "dtype": dtype,
                    "accuracy_level": accuracy[prov], "lm_head": head,
                    "residual_dtype": residual[prov],
                    "weight_bytes": info.weight_bytes, "resident_bytes": info.resident_bytes,
                    "creation_extra_bytes": info.creation_extra_bytes,
                    "kv_bytes_per_token": kv_bytes_per_token(model_facts, dtype),
                    "workspace": ws, "stated_context": ctx,
                    "workspace_bytes_at_stated_context": workspace_bytes(ws, ctx),
                }
                if prov == "cuda" or cuda_info is None:
                    cuda_info = info
            variants.append({
                "name": plan.name, "rank": rank, "precisions": list(plan.precisions),
                "layer_counts": plan.counts,
                "avg_bits": round(avg_bits_real(cuda_info.decoder_linear_bytes,
                                                [per_layer] * spec.num_layers), 4),
                "avg_bits_nominal": round(plan.avg_bits_nominal(part_params(spec)), 4),
                "weight_bytes": cuda_info.weight_bytes,
                "bits_per_weight": round(8 * cuda_info.weight_bytes / params, 4),
                "tables": table_prec,
                "providers": providers,
            })
            c = plan.counts
            log(f"{plan.name}: {c['int8']} INT8 / {c['int4']} INT4"
                + (f" / {c['mixed']} mixed" if c["mixed"] else "") + f" layers, embedding "
                f"{table_prec['embed_tokens']}, head {table_prec['lm_head']}, "
                f"{8 * cuda_info.weight_bytes / params:.2f} bits per weight "
                f"({rank + 1}/{len(plans)})")

        d = prof.deployment
        manifest = {
            "format": "lsaq-bundle", "schema_version": SCHEMA_VERSION,
            "created_by": f"lsaq-compile {__version__}",
            "model": {
                "name": spec.name, "architecture": spec.architecture,
                "source": {"kind": source.kind, "path": str(source.path),
                           "sha256": source.fingerprint()},
                "num_layers": spec.num_layers, "hidden_size": spec.hidden_size,
                "intermediate_size": spec.intermediate_size,
                "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
                "max_position_embeddings": spec.max_position_embeddings,
                "max_context": max_context, "tie_word_embeddings": spec.tie_word_embeddings,
                "num_parameters": params,
                **({"rope_switch_length": switch} if switch and switch < max_context else {}),
            },
            "tokenizer": {"dir": "tokenizer", **tok},
            "scores": _scores_record(sc, additive),
            "quantization": {
                "scheme": prof.quantization.scheme, "symmetric": prof.quantization.symmetric,
                "group_size": prof.quantization.group_size if prof.quantization.scheme == "group" else None,
                "int8": schemes["int8"].name, "int4": schemes["int4"].name,
                "block_size": q.block_size or None, "cpu_accuracy_level": q.cpu_accuracy_level,
                "cpu_lm_head": q.cpu_lm_head, "clip": q.clip, "clip_calibration": act_calib,
                "tables": q.tables if tables_on_ladder(prof) else "fp16",
                "table_schemes": {p: table_scheme(schemes, p).name for p in ("int8", "int4")},
            },
            "deployment": {
                "profile": prof.name,
                "context_length": d.context_length, "batch_size": d.batch_size,
                "safety_margin": {"fraction": d.safety_margin_fraction,
                                  "min_bytes": parse_size(d.safety_margin_min)},
                "runtime_overhead_bytes": {"cpu": parse_size(d.runtime_overhead_cpu),
                                           "cuda": parse_size(d.runtime_overhead_cuda)},
            },
            "variants": variants,
            **({"build_checks": {"float16": f16_facts}} if f16_facts else {}),
        }
        progress("checksums: hashing bundle files")
        manifest["files"] = _file_entries(tmp)
        _validate(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if held_out is not None:
            # Each variant's graph on held-out calibration windows, through the runtime (the
            # bundle is complete but still in its temporary folder); then rank by it.
            _measure_quality(tmp, manifest, held_out, plan_kl, calib, progress.stage("quality"))
            _validate(manifest)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _swap_in(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = e.filename or out
        raise LsaqError(f"{where}: cannot write the bundle ({e.strerror or e}); nothing was "
                        "written: free disk space or choose another -o") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"bundle written to {out} in {time.perf_counter() - t0:.1f}s")
    return out


def _scores_record(sc, additive: dict) -> dict:
    rec = sc.to_json()
    if additive:
        rec["params"] = {**rec["params"], "additive_fit": additive}
    return rec


def _measure_quality(root: Path, manifest: dict, windows, plan_kl: dict, calib, log) -> None:
    """Quality of every variant's CPU graph on held-out calibration windows (each framed as the
    model frames a prompt): its perplexity and its KL from the FP16 variant's graph on the same
    tokens. Recorded in the manifest, which then ranks variants by the KL
    (deployment.rank_by = kl_fp16): paired against the same reference, it is far less noisy than
    a perplexity difference, and unlike perplexity it cannot improve under quantization noise
    (docs/results/ranking.md measures both against WikiText-2). The runtime's rule that a
    variant never ranks above one at least as precise in every part applies on top."""
    import tempfile

    from lsaq_runtime.planner import quality_order

    from .evaluate import _log_softmax, onnx_logits_fn

    n, seq = windows.shape
    t0 = time.perf_counter()
    variants = sorted(manifest["variants"], key=lambda v: v["name"] != "fp16")  # FP16 first
    if variants[0]["name"] != "fp16":
        raise LsaqError("quality ranking needs the fp16 variant as the reference")
    with tempfile.TemporaryDirectory(prefix="lsaq-quality-") as work:
        # The reference distributions for every held-out position, on disk: vocabulary x
        # positions can reach gigabytes (262k x 2k x 4 bytes for Gemma 3).
        ref = np.lib.format.open_memmap(Path(work) / "fp16.npy", "w+", np.float32,
                                        (n, seq - 1, manifest["model"]["vocab_size"]))
        for v in variants:
            fn = onnx_logits_fn(root, manifest, v["name"], context=seq)
            nll = kl = 0.0
            for w in range(n):
                lp = _log_softmax(fn(windows[w])[:-1])           # float64 [seq - 1, vocab]
                nll -= float(lp[np.arange(seq - 1), windows[w, 1:]].sum())
                if v["name"] == "fp16":
                    ref[w] = lp
                else:
                    for a in range(0, seq - 1, 32):   # bounded temporaries at any vocabulary
                        r = ref[w, a:a + 32].astype(np.float64)
                        kl += float((np.exp(r) * (r - lp[a:a + 32])).sum())
            fn.close()
            tokens = n * (seq - 1)
            v["quality"] = {"perplexity": round(math.exp(nll / tokens), 4), "tokens": tokens,
                            "kl_fp16": round(kl / tokens, 6)}
            if v["name"] in plan_kl:  # the torch measurement on the calibration windows
                v["quality"]["kl"] = round(plan_kl[v["name"]], 6)
            log(f"{v['name']}: KL from FP16 {kl / tokens:.5f}, perplexity "
                f"{math.exp(nll / tokens):.3f} on {n} held-out windows "
                f"({time.perf_counter() - t0:.0f}s)")
        del ref
    manifest["variants"] = quality_order(manifest["variants"], "kl_fp16")
    for rank, v in enumerate(manifest["variants"]):
        v["rank"] = rank
    manifest["deployment"]["rank_by"] = "kl_fp16"
    manifest["deployment"]["quality"] = {
        "what": "each variant's CPU graph on held-out calibration windows: KL from the FP16 "
                "variant's CPU graph (ranks the variants) and perplexity",
        "source": calib.source, "windows": int(n), "seq_len": int(seq),
        "prefix": list(calib.prefix)}


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

    from .evaluate import _log_softmax
    from .export_onnx import build_graph

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
            kl = sum(float((np.exp(_log_softmax(r)) * (_log_softmax(r) - _log_softmax(x))).sum())
                     for r, x in zip(ref, got)) / (len(got) * seq)
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


def check_replaceable(out: Path, force: bool) -> None:
    """A build may only replace an existing folder that is an LSAQ bundle, and only with force."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise LsaqError(f"{out} already exists; pass --force to replace it")
    why = replace_refusal(out)
    if why:
        raise LsaqError(f"{why}; --force only replaces an LSAQ bundle, so nothing was deleted: "
                        "choose another -o or remove the folder yourself")


def _validate(manifest: dict) -> None:
    """Check what we wrote against the runtime's schema: the runtime owns the contract."""
    from lsaq_runtime.manifest import validate_manifest

    validate_manifest(manifest)


def read_manifest(bundle: str | os.PathLike) -> dict:
    """The manifest of an existing bundle, checked by the runtime's reader (sizes included)."""
    from lsaq_runtime.manifest import load_manifest

    return load_manifest(bundle)
