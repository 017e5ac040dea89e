"""`lsaq-compile`: score layers, build a bundle, inspect it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import click

from lsaq_runtime.errors import LsaqRuntimeError, first_line, printable
from lsaq_runtime.format import METRICS

from .errors import LsaqError, Terminated
from .profiles import MEASURES, QUALITY_ENGINES, SCORING_DTYPES
from .progress import Progress


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _writable_target(path: str | None, option: str) -> None:
    """Fail before hours of work, not after: the folder an output file goes into must exist."""
    if not path:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise LsaqError(f"{p}: is a folder; {option} takes a file path")
    if not parent.is_dir():
        raise LsaqError(f"{parent}: no such folder for {option} {p}; create it first")
    if not os.access(parent, os.W_OK):
        raise LsaqError(f"{parent}: not writable, so {option} {p} cannot be written")


def _write_text(path: str | Path, text: str) -> None:
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise LsaqError(f"{path}: cannot be written ({e.strerror}); free disk space or choose "
                        "another path") from None


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lsaq")
def cli():
    """LSAQ compiler: layer-specific adaptive quantization into a deployable bundle."""


@cli.command()
@click.argument("model", required=False)
@click.option("--metric", type=click.Choice(METRICS), default="jaccard", show_default=True,
              help="jaccard: LSAQ (top-k token sets); cosine, zscore: LWQ baselines; "
                   "sensitivity: measured KL of quantizing each linear of each layer (profile scoring.granularity).")
@click.option("--k", "k", type=click.IntRange(1), default=10, show_default=True, help="top-k tokens (jaccard)")
@click.option("--final-norm", is_flag=True, help="apply the model's final norm before projecting (logit lens)")
@click.option("--calibration", type=click.Path(dir_okay=False), help="UTF-8 text file [default: built-in]")
@click.option("--samples", type=click.IntRange(1), help="windows [default: 32; sensitivity: the profile's]")
@click.option("--seq-len", type=click.IntRange(2), help="tokens per window [default: 256; sensitivity: the profile's]")
@click.option("--profile", default="default", show_default=True,
              help="sensitivity: the profile whose INT8/INT4 schemes are measured")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="scores.json", show_default=True)
@click.option("--plot", type=click.Path(dir_okay=False), help="write a bar chart of importance per layer (PNG)")
@click.option("-q", "--quiet", is_flag=True)
def score(model, metric, k, final_norm, calibration, samples, seq_len, profile, output, plot, quiet):
    """Score every decoder layer's importance. MODEL: HF folder or .gguf (default: SmolLM2-135M)."""
    from .calibration import load_calibration, load_tokenizer
    from .importance import score_model
    from .model_source import open_model

    _writable_target(output, "-o")
    _writable_target(plot, "--plot")
    progress = Progress(quiet)
    source = open_model(model)
    progress(f"model: {source.spec.name} ({source.spec.num_layers} layers) from {source.path}")
    if metric == "sensitivity":
        result = _score_sensitivity(source, profile, calibration, samples, seq_len, progress)
    else:
        calib = None
        if metric != "zscore":
            calib = load_calibration(calibration, load_tokenizer(source), samples=samples or 32,
                                     seq_len=seq_len or 256)
            progress(f"calibration: {calib.samples} x {calib.seq_len} tokens from {calib.source}")
        log = progress.stage("scoring")
        result = score_model(source, metrics=(metric,), k=k, final_norm=final_norm, calibration=calib,
                             progress=lambda i, n, s: log(f"layer {i + 1}/{n} ({s:.1f}s)"))[metric]
    _write_text(output, json.dumps(result.to_json(), indent=1))
    rank = {layer: r for r, layer in enumerate(result.order)}
    rows = [[i, f"{v:.4f}", rank[i] + 1] for i, v in enumerate(result.importance)]
    click.echo(_table(["layer", f"importance ({metric})", "rank (1 = least important)"], rows))
    click.echo(f"order, least important first: {list(result.order)}")
    click.echo(f"wrote {output}")
    if plot:
        from .plots import plot_importance

        plot_importance(result, plot)
        click.echo(f"wrote {plot}")


def _score_sensitivity(source, profile, calibration, samples, seq_len, progress):
    """Measured sensitivity with a profile's quantizers; a build given these scores reuses them."""
    from .bundle import score_for_profile
    from .profiles import load_profile

    prof = load_profile(profile)
    prof.build.quality_samples = 0
    prof.scoring.calibration = calibration or prof.scoring.calibration
    prof.scoring.samples = samples or prof.scoring.samples
    prof.scoring.seq_len = seq_len or prof.scoring.seq_len
    return score_for_profile(source, prof, "sensitivity", progress)


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), required=True, help="bundle folder to create")
@click.option("--profile", default="default", show_default=True, help="default | paper | path to a .toml")
@click.option("--scores", type=click.Path(dir_okay=False), help="reuse a scores.json instead of scoring")
@click.option("--metric", type=click.Choice(METRICS), help="override the profile's metric")
@click.option("--calibration", type=click.Path(dir_okay=False),
              help="UTF-8 calibration text (overrides the profile's scoring.calibration)")
@click.option("--chat-template", "chat_template", type=click.Path(dir_okay=False),
              help="a Jinja chat template file, for sources that carry none (or to replace theirs)")
@click.option("--force", is_flag=True, help="replace an existing bundle folder")
@click.option("--resume", is_flag=True, help="continue the interrupted build of -o (same "
              "arguments; the quality engine may change): finished stages and measurements "
              "are reused")
@click.option("--remeasure", is_flag=True, help="measure again even when an earlier build of "
              "this model kept a measurement of the same calibration and quantizers")
@click.option("--measure", type=click.Choice(MEASURES), help="override the profile's "
              "scoring.measure: exact (each unit's KL alone) or fisher (streamed estimate)")
@click.option("--device", default="cpu", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="where the torch measurement runs (auto: cuda when torch sees one)")
@click.option("--quality-engine", "quality_engine", type=click.Choice(QUALITY_ENGINES),
              help="override the profile's build.quality_engine: graphs (each variant's CPU "
              "graph), streamed (torch, one layer at a time) or auto (graphs where they fit)")
@click.option("--fisher-dtype", "fisher_dtype", type=click.Choice(SCORING_DTYPES),
              help="override the profile's scoring.dtype: the fisher estimate's compute dtype "
              "(bfloat16: about 2.3x faster on CPUs with bfloat16 instructions; refused on "
              "a CPU without them, where it is about 200x slower)")
@click.option("-q", "--quiet", is_flag=True)
def build(model, out, profile, scores, metric, calibration, chat_template, force, resume,
          remeasure, measure, device, quality_engine, fisher_dtype, quiet):
    """Score (unless --scores), quantize, export every variant and write the bundle."""
    from .bundle import build_bundle, read_manifest
    from .profiles import load_profile

    prof = load_profile(profile)
    if calibration:
        prof.scoring.calibration = calibration
    if quality_engine:
        prof.build.quality_engine = quality_engine
    if fisher_dtype:
        prof.scoring.dtype = fisher_dtype
    template = _read_template(chat_template) if chat_template else None
    path = build_bundle(model, out, profile=prof, scores=scores, metric=metric, force=force,
                        progress=Progress(quiet), chat_template=template, resume=resume,
                        remeasure=remeasure, device=device, measure=measure)
    click.echo(variant_table(read_manifest(path)))


def _read_template(path: str) -> str:
    """A chat template file's text, checked to parse as Jinja before hours of building."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LsaqError(f"{p}: chat template file not found") from None
    except UnicodeDecodeError as e:
        raise LsaqError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise LsaqError(f"{p}: cannot be read ({e.strerror})") from None
    try:
        import jinja2.sandbox

        jinja2.sandbox.ImmutableSandboxedEnvironment().parse(text)
    except Exception as e:  # jinja2 raises TemplateSyntaxError and friends
        raise LsaqError(f"{p}: not a valid Jinja chat template ({first_line(e)})") from None
    if not text.strip():
        raise LsaqError(f"{p}: the chat template is empty")
    return text


def variant_table(manifest: dict) -> str:
    rows = []
    for v in manifest["variants"]:
        c = v["layer_counts"]
        prov = v["providers"].get("cpu", v["providers"].get("cuda"))
        weights = v.get("weight_bytes", prov.get("weight_bytes", 0))
        nominal = v.get("avg_bits_nominal")
        q = v.get("quality")
        t = v.get("tables") or {}
        tables = "/".join(dict.fromkeys(t.get(k, "fp16") for k in ("embed_tokens", "lm_head")))
        bpw = v.get("bits_per_weight")
        rows.append([v["name"], c["fp16"], c["int8"], c["int4"], c.get("mixed", 0), tables,
                     f"{v['avg_bits']:.2f}",
                     f"{nominal:.2f}" if isinstance(nominal, (int, float)) else "-",
                     f"{bpw:.2f}" if isinstance(bpw, (int, float)) else "-",
                     _mib(weights), _mib(prov["resident_bytes"]),
                     f"{q['kl_fp16']:.5f}" if q and "kl_fp16" in q else "-",
                     f"{q['perplexity']:.3f}" if q else "-"])
    head = ["variant", "FP16", "INT8", "INT4", "mixed", "tables", "avg bits", "nominal",
            "bits/weight", "weight bytes", "cpu resident", "KL vs fp16", "calib ppl"]
    total = sum(f["bytes"] for f in manifest["files"])
    out = _table(head, rows) + f"\n{len(manifest['variants'])} variants; bundle files {_mib(total)}"
    fp16 = next((v.get("weight_bytes") for v in manifest["variants"] if v["name"] == "fp16"), None)
    if fp16:
        out += f" = {total / fp16:.2f} x the FP16 variant's weight bytes"
    return out


@cli.command()
@click.argument("bundle", type=click.Path())
def inspect(bundle):
    """Print the variant table of an existing bundle."""
    from .bundle import read_manifest

    m = read_manifest(bundle)
    s, q = m.get("scores") or {}, m.get("quantization") or {}
    click.echo(printable(
        f"{m['model']['name']} ({m['model']['architecture']}, {m['model']['num_layers']} layers); "
        f"scores: {s.get('metric', '?')} "
        f"{ {k: v for k, v in s.get('params', {}).items() if not isinstance(v, (dict, list))} }; "
        "quantization: "
        f"{q.get('int8', '?')}, {q.get('int4', '?')}"))
    click.echo(printable(variant_table(m)))
    table = evaluations_table(bundle, m)
    if table:
        click.echo(printable(table))


def evaluations_table(bundle, manifest: dict) -> str:
    """The results `eval` recorded beside the manifest (or, in an older bundle, inside it)."""
    from .evaluate import read_evaluations

    rows = [[e.get("variant", "?"), e.get("kind", "?"), e.get("task") or Path(str(e.get("data", "?"))).name,
             e.get("engine", "onnx"), f"{e['value']:.4f}" if isinstance(e.get("value"), (int, float)) else "-"]
            for e in read_evaluations(bundle, manifest)]
    if not rows:
        return ""
    return "\nrecorded evaluations\n" + _table(["variant", "kind", "data", "engine", "value"], rows)


def _variant_names(manifest: dict, spec: str) -> list[str]:
    names = [v["name"] for v in manifest["variants"]]
    if spec == "all":
        return names
    want = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [w for w in want if w not in names]
    if unknown:
        raise LsaqError(f"unknown variant(s) {', '.join(unknown)}; the bundle has {', '.join(names)}")
    return want


@cli.command("eval")
@click.argument("bundle", type=click.Path())
@click.option("--text", type=click.Path(dir_okay=False), help="text for perplexity (e.g. WikiText-2 test)")
@click.option("--seq-len", type=click.IntRange(2), default=1024, show_default=True)
@click.option("--windows", type=click.IntRange(1), default=None, help="first N windows [default: all]")
@click.option("--tasks", help="zero-shot tasks by name (piqa,arc_easy,arc_challenge,boolq,winogrande or all; "
              "needs --data), or a multiple-choice JSONL file: context, choices, label")
@click.option("--data", type=click.Path(file_okay=False), help="folder of the zero-shot tasks' published files "
              "(laid out like shared/data/zeroshot)")
@click.option("--limit", type=click.IntRange(1), default=None, help="first N questions of each task [default: all]")
@click.option("--cross-check", is_flag=True, help="also run each variant through real lm-evaluation-harness "
              "on the same questions and compare (needs the eval extra)")
@click.option("--variants", default="all", show_default=True, help="all, or a comma list of names")
@click.option("--reference", is_flag=True, help="also run the torch reference of each plan (needs the source model)")
@click.option("-q", "--quiet", is_flag=True)
def eval_cmd(bundle, text, seq_len, windows, tasks, data, limit, cross_check, variants, reference, quiet):
    """Perplexity and multiple-choice accuracy of each variant, run on its ONNX graph."""
    import datetime

    from .bundle import read_manifest
    from . import evaluate as ev
    from . import zeroshot as zs

    if not text and not tasks:
        raise LsaqError("nothing to evaluate: give --text FILE (perplexity) and/or --tasks "
                        "(task names with --data DIR, or FILE.jsonl)")
    progress = Progress(quiet)
    bundle = Path(bundle)
    m = read_manifest(bundle)
    names = _variant_names(m, variants)
    codec = ev.bundle_codec(bundle, m)     # the runtime's encoder: windows start as prompts do
    tw = ev.text_windows(text, codec, seq_len, windows) if text else None
    task_items = {}   # task name -> (its items, file sha256 or None, source)
    if tasks and tasks.endswith(".jsonl"):
        if cross_check:
            raise LsaqError("--cross-check runs lm-eval's own task definitions: name the tasks "
                            "(piqa, arc_easy, ...) with --data, not a JSONL file")
        task_items[Path(tasks).name] = (ev.load_choice_tasks(tasks), ev.file_sha256(tasks), str(tasks))
    elif tasks:
        if not data:
            raise LsaqError("zero-shot tasks by name need --data DIR: the folder of their published "
                            "files (e.g. ../shared/data/zeroshot)")
        for t in zs.parse_tasks(tasks):
            task_items[t] = (zs.load_task(t, data, limit), None, str(data))
    encode = ev.encoder(codec) if task_items else None
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    entries, rows, checks = [], [], []
    for name in names:
        v = next(x for x in m["variants"] if x["name"] == name)
        fns = {"onnx": ev.onnx_logits_fn(bundle, m, name, context=seq_len)}
        if reference:
            fns["torch"] = ev.torch_logits_fn(m["model"]["source"]["path"], v["precisions"],
                                              m["quantization"], tables=v.get("tables"))
        row = [name, f"{v['avg_bits']:.2f}"]
        for kind, fn in fns.items():
            base = {"variant": name, "provider": "cpu", "engine": kind, "created": now}
            if tw is not None:
                r = ev.perplexity(fn, tw, progress=progress.stage(f"eval {name} [{kind}]"))
                entries.append({**base, "kind": "perplexity", "data": tw.source, "data_sha256": tw.sha256,
                                "settings": {"seq_len": seq_len, "windows": r["windows"]},
                                "value": r["perplexity"], "tokens": r["tokens"]})
                row.append(f"{r['perplexity']:.3f}")
            for t, (items, sha, src) in task_items.items():
                r = ev.multiple_choice(fn, encode, items, progress=progress.stage(f"{t} {name} [{kind}]"))
                entries.append({**base, "kind": "multiple_choice", "task": t, "data": src,
                                "data_sha256": sha, "settings": {"limit": limit} if sha is None else {},
                                "value": r["acc"], "acc_stderr": r["acc_stderr"],
                                "acc_norm": r.get("acc_norm"), "items": r["items"]})
                row.append(f"{r['acc']:.3f}±{r['acc_stderr']:.3f}" + (f" / {r['acc_norm']:.3f}" if "acc_norm" in r else ""))
                if cross_check and kind == "onnx":
                    checks.append((name, t, r))
            if hasattr(fn, "close"):  # one variant's session at a time, not all of them
                fn.close()
        rows.append(row)
    if checks:
        import tempfile

        from .lm_eval_adapter import zero_shot

        for name in dict.fromkeys(n for n, _, _ in checks):
            ts = [t for n, t, _ in checks if n == name]
            progress(f"cross-check {name}: {', '.join(ts)} through lm-evaluation-harness")
            with tempfile.TemporaryDirectory() as work:
                theirs = zero_shot(bundle, name, ts, data, work, limit)
            for n, t, r in checks:
                if n == name:
                    th = theirs[t]
                    same = zs.agrees(r, th)
                    click.echo(f"cross-check {name} {t}: acc {r['acc']:.4f} (ours) vs {th['acc']:.4f} "
                               f"(lm-eval) on {th['items']} questions: {'identical' if same else 'DIFFERENT'}")
                    if not same:
                        raise LsaqError(f"cross-check failed: {name} {t} differs from lm-evaluation-harness")
    ev.record_evaluations(bundle, [e for e in entries if e["engine"] == "onnx"])
    head = ["variant", "avg bits"]
    for kind in (["onnx", "torch"] if reference else ["onnx"]):
        head += ([f"ppl ({kind})"] if tw is not None else []) + \
            [f"{t} acc" + (" / acc_norm" if not zs.TASKS.get(t) or "acc_norm" in zs.TASKS[t].metrics else "")
             + f" ({kind})" for t in task_items]
    click.echo(_table(head, rows))
    click.echo(f"results recorded in {bundle / ev.EVALUATIONS}")


@cli.command()
@click.argument("model", required=False)
@click.option("--metrics", default="jaccard,cosine,zscore", show_default=True)
@click.option("--text", type=click.Path(dir_okay=False), required=True, help="evaluation text (WikiText-2 test)")
@click.option("--calibration", type=click.Path(dir_okay=False), help="calibration text [default: built-in]")
@click.option("--samples", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seq-len", type=click.IntRange(2), default=256, show_default=True, help="calibration window")
@click.option("--k", "k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--final-norm", is_flag=True)
@click.option("--eval-seq-len", type=click.IntRange(2), default=1024, show_default=True)
@click.option("--windows", type=click.IntRange(1), default=16, show_default=True)
@click.option("--reference-windows", type=click.IntRange(0), default=4, show_default=True,
              help="windows on which each plan is cross-checked against torch (0: skip)")
@click.option("--budgets", default=None, help="comma list of sizes for the budget table [default: spread over the needs]")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), default="docs/results", show_default=True)
@click.option("--bundles", type=click.Path(file_okay=False), help="where the per-metric bundles go [default: OUTPUT/bundles]")
@click.option("--force", is_flag=True, help="rebuild bundles even when their scores are unchanged")
@click.option("--data", type=click.Path(file_okay=False), help="folder of the zero-shot tasks (like "
              "shared/data/zeroshot) for Table I [default: no Table I]")
@click.option("--tasks", default="all", show_default=True, help="zero-shot tasks for Table I")
@click.option("--items", type=click.IntRange(0), default=200, show_default=True,
              help="first N questions of each task (0: all)")
@click.option("--no-cross-check", is_flag=True, help="skip running FP16 through real lm-evaluation-harness")
@click.option("--quick", is_flag=True, help="small sizes throughout (a few minutes; for tests, not results)")
def study(model, metrics, text, calibration, samples, seq_len, k, final_norm, eval_seq_len, windows,
          reference_windows, budgets, out, bundles, force, data, tasks, items, no_cross_check, quick):
    """The paper's comparison: perplexity (Table III) and zero-shot accuracy (Table I) against
    average bits for each metric's layer order, and which variant each memory budget gets."""
    from lsaq_runtime.sizes import parse_size

    from .study import run_study

    ms = tuple(m.strip() for m in metrics.split(",") if m.strip())
    bad = [m for m in ms if m not in METRICS]
    if bad or not ms:
        raise LsaqError(f"unknown metric(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METRICS)}")
    bl = [parse_size(b) for b in budgets.split(",")] if budgets else None
    d = run_study(model, ms, text, out, bundles, calibration, samples, seq_len, k, final_norm,
                  eval_seq_len, windows, reference_windows, bl, force, tasks_dir=data, tasks=tasks,
                  items=items or None, cross_check=not no_cross_check, quick=quick)
    click.echo((d / "report.md").read_text())


@cli.command()
@click.argument("bundle", type=click.Path())
@click.option("--variant", required=True, help="the variant to export (see `inspect`)")
@click.option("--to", "target", type=click.Choice(["gguf", "compressed-tensors"]), required=True,
              help="gguf: one file for llama.cpp / Ollama; compressed-tensors: a Hugging Face "
                   "folder for vLLM / transformers")
@click.option("-o", "--output", "out", type=click.Path(), required=True,
              help="FILE.gguf, or the folder to create")
@click.option("--force", is_flag=True, help="replace an earlier export at that path")
@click.option("--no-modelfile", is_flag=True, help="gguf: no Ollama Modelfile beside the file")
@click.option("--errors-json", type=click.Path(dir_okay=False),
              help="also write each tensor's type and relative RMS error as JSON")
@click.option("--embedding-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True,
              help="compressed-tensors: how a quantized embedding table is written (its "
                   "dequantized values; vLLM reads no quantized embedding): float32 exact, "
                   "float16 half the bytes, rounded")
@click.option("-q", "--quiet", is_flag=True)
def export(bundle, variant, target, out, force, no_modelfile, errors_json, embedding_dtype,
           quiet):
    """Write one variant's plan for another engine, from the bundle's own codes and scales."""
    progress = Progress(quiet)
    if target == "gguf":
        from .export_gguf import export_gguf

        rep = export_gguf(bundle, variant, out, force=force, modelfile=not no_modelfile,
                          progress=progress.stage("export"), errors_json=errors_json)
    else:
        from .export_compressed import export_compressed

        rep = export_compressed(bundle, variant, out, force=force,
                                progress=progress.stage("export"), errors_json=errors_json,
                                embedding_dtype=embedding_dtype)
    for line in rep.lines():
        click.echo(printable(line))


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None):
    """Every failure ends as one line on stderr and exit code 2 (130 when interrupted, 143 when
    terminated)."""
    # `kill`, a service manager's stop, a batch system's time limit: SIGTERM's default action
    # ends the process at once, leaving what a build keeps outside its folder (the converted
    # tokenizer, a standalone run's hidden states) in the system's temporary folder. Unwinding
    # removes it; the build folder's job record is kept for --resume, as after Ctrl-C. A
    # handler an embedding program set is left alone; ours is removed on return.
    own = (threading.current_thread() is threading.main_thread()
           and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if own:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _main(argv)
    finally:
        if own:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(argv) -> None:
    from lsaq_runtime.cli import DEBUG_ENV, describe_unexpected

    try:
        cli.main(args=argv, standalone_mode=False)
    except (LsaqError, LsaqRuntimeError) as e:
        click.echo(f"error: {printable(str(e), newlines=False)}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("terminated (SIGTERM); a build continues with --resume", err=True)
        sys.exit(143)
    except MemoryError:  # the runtime's advice (--memory-budget, --context) is not the compiler's
        click.echo("error: out of memory while compiling; the model needs more free memory than "
                   "this machine has (close other programs, or compile on a larger machine)",
                   err=True)
        sys.exit(2)
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        click.echo(f"error: {printable(describe_unexpected(e), newlines=False)}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
