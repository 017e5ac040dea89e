"""The paper's comparison, on the shipped artifacts: does the Jaccard order (LSAQ) lose less
perplexity than LWQ's orders at the same average bits?

One calibration pass scores every metric; one bundle per metric (full ladder, so the memory
table can use every mix); FP16, INT8 and all-INT4 are the same plan under every metric and are
evaluated once. Each plan's ONNX perplexity is cross-checked against the torch reference of the
same dequantized weights on the first `reference_windows` windows.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

from .errors import LsaqError
from .progress import Progress

PAPER_POINTS = ("fp16", "int8", "25%", "50%", "75%", "int4")


def _variant_for_point(manifest: dict, point: str) -> dict:
    from .plan import paper_counts

    if point in ("fp16", "int8", "int4"):
        return next(v for v in manifest["variants"] if v["name"] == point)
    L = manifest["model"]["num_layers"]
    n = paper_counts(L)[("25%", "50%", "75%").index(point)]
    return next(v for v in manifest["variants"] if v["layer_counts"]["int4"] == n)


def _budget_table(manifest: dict, budgets: list[int], provider: str) -> list[dict]:
    """For each budget, what the runtime's planner would choose (nothing is loaded)."""
    from lsaq_runtime.planner import plan
    from lsaq_runtime.probe import Device

    rows = []
    for b in budgets:
        dev = Device(provider, 0 if provider == "cuda" else None, "simulated", b, b, "study")
        d = plan(manifest, dev)
        r = d.chosen_row
        rows.append({"budget": b, "variant": d.chosen,
                     "counts": r.layer_counts if r else None,
                     "avg_bits": r.avg_bits if r else None,
                     "need": r.need_bytes if r else d.smallest_need})
    return rows


def run_study(model=None, metrics=("jaccard", "cosine", "zscore"), text=None, out_dir="docs/results",
              bundles_dir=None, calibration=None, samples=32, seq_len=256, k=10, final_norm=False,
              eval_seq_len=1024, windows=16, reference_windows=4, budgets=None, force=False,
              progress: Progress | None = None) -> Path:
    from . import evaluate as ev
    from .bundle import build_bundle, read_manifest
    from .calibration import load_calibration, load_tokenizer
    from .importance import score_model
    from .model_source import open_model
    from .plots import plot_importance, plot_quality_vs_bits
    from .profiles import load_profile

    progress = progress or Progress()
    if text is None:
        raise LsaqError("the study needs --text FILE (evaluation text, e.g. WikiText-2 test)")
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundles_dir = Path(bundles_dir) if bundles_dir else out_dir / "bundles"
    source = open_model(model)

    # 1. one calibration pass, every metric
    calib = load_calibration(calibration, load_tokenizer(source), samples=samples, seq_len=seq_len)
    log = progress.stage("scoring")
    scores = score_model(source, metrics=tuple(metrics), k=k, final_norm=final_norm, calibration=calib,
                         progress=lambda i, n, s: log(f"layer {i + 1}/{n} ({s:.1f}s)"))
    plot_importance(scores, out_dir / "importance.png")

    # 2. one bundle per metric, reused when its scores are unchanged
    manifests, bundles = {}, {}
    for metric in metrics:
        b = bundles_dir / metric
        reuse = False
        if b.exists() and not force:
            try:
                old = read_manifest(b)
                reuse = old["scores"]["order"] == list(scores[metric].order) and \
                    old["scores"].get("calibration") == scores[metric].to_json().get("calibration")
            except Exception:
                reuse = False
        if not reuse:
            progress(f"building the {metric} bundle")
            build_bundle(source.path, b, profile=load_profile("default"), scores=scores[metric],
                         force=True, progress=Progress(quiet=True))
        else:
            progress(f"reusing {b} (same scores)")
        bundles[metric], manifests[metric] = b, read_manifest(b)

    # 3. evaluate each distinct plan once: ONNX on every window, torch on the first few
    m0 = manifests[metrics[0]]
    tw = ev.text_windows(text, bundles[metrics[0]] / "tokenizer" / "tokenizer.json",
                         eval_seq_len, windows)
    q = m0["quantization"]
    cache: dict[tuple, dict] = {}
    results: dict[str, dict[str, dict]] = {}
    for metric in metrics:
        results[metric] = {}
        for point in PAPER_POINTS:
            v = _variant_for_point(manifests[metric], point)
            key = tuple(v["precisions"])
            if key not in cache:
                cache[key] = _evaluate_plan(ev, bundles[metric], manifests[metric], v, metric, tw,
                                            eval_seq_len, reference_windows, source.path, q, progress)
            results[metric][point] = cache[key]

    # 4. which variant each memory budget gets (the paper's Table IV), from the jaccard bundle
    mj = manifests["jaccard" if "jaccard" in manifests else metrics[0]]
    budget_rows = {}
    for prov in ("cpu", "cuda"):
        bl = budgets or _default_budgets(_needs(mj, prov))
        budget_rows[prov] = _budget_table(mj, bl, prov)

    plot_quality_vs_bits(results, out_dir / "perplexity_vs_bits.png")
    summary = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "model": m0["model"]["name"], "metrics": list(metrics),
        "calibration": scores[metrics[0]].to_json().get("calibration"),
        "scores": {m: {"importance": list(scores[m].importance), "order": list(scores[m].order)}
                   for m in metrics},
        "text": {"source": tw.source, "sha256": tw.sha256, "seq_len": eval_seq_len,
                 "windows": len(tw.windows)},
        "results": results, "budgets": budget_rows,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "report.md").write_text(render_report(summary))
    progress(f"study written to {out_dir} in {summary['seconds']:.0f}s")
    return out_dir


def _recorded(manifest: dict, variant: str, engine: str, tw, seq_len: int, windows: int):
    """A perplexity already measured on this bundle with the same text and settings."""
    for e in manifest.get("evaluations", []):
        if (e.get("kind"), e.get("variant"), e.get("engine"), e.get("data_sha256")) == \
                ("perplexity", variant, engine, tw.sha256) and \
                e.get("settings") == {"seq_len": seq_len, "windows": windows} and "per_window_nll" in e:
            return e
    return None


def _evaluate_plan(ev, bundle, manifest, v, metric, tw, seq_len, reference_windows, model_path, q,
                   progress) -> dict:
    """ONNX perplexity on every window and the torch reference on the first few, each measured
    once per bundle: results (with per-window NLL) are recorded in the manifest and reused."""
    name = f"{metric}/{v['name']}"
    runs = {"onnx": len(tw.windows), "torch": reference_windows}
    got = {}
    for engine, n in runs.items():
        if not n:
            continue
        e = _recorded(manifest, v["name"], engine, tw, seq_len, n)
        if e is None:
            fn = (ev.onnx_logits_fn(bundle, manifest, v["name"], context=seq_len) if engine == "onnx" else
                  ev.torch_logits_fn(model_path, v["precisions"], q["scheme"], q.get("group_size"),
                                     q.get("symmetric", True)))
            r = ev.perplexity(fn, tw, limit=n, progress=progress.stage(f"eval {name} [{engine}]"))
            e = {"kind": "perplexity", "variant": v["name"], "provider": "cpu", "engine": engine,
                 "data": tw.source, "data_sha256": tw.sha256,
                 "settings": {"seq_len": seq_len, "windows": n}, "value": r["perplexity"],
                 "tokens": r["tokens"], "per_window_nll": r["per_window_nll"]}
            ev.record_evaluations(bundle, [e])
            manifest.setdefault("evaluations", []).append(e)
        else:
            progress(f"eval {name} [{engine}]: reusing the result recorded in {bundle}")
        got[engine] = e
    ref = None
    if "torch" in got:
        sub = got["onnx"]["per_window_nll"][:reference_windows]
        onnx_sub = math.exp(sum(sub) / len(sub))
        t = got["torch"]["value"]
        ref = {"windows": reference_windows, "onnx": onnx_sub, "torch": t, "rel_diff": abs(onnx_sub - t) / t}
    return {"variant": v["name"], "bundle": metric, "avg_bits": v["avg_bits"],
            "avg_bits_nominal": v["avg_bits_nominal"], "layer_counts": v["layer_counts"],
            "perplexity": got["onnx"]["value"], "tokens": got["onnx"]["tokens"], "reference": ref}


def _needs(manifest: dict, provider: str) -> list[int]:
    """Every variant's need as the runtime's planner computes it (its default context)."""
    from lsaq_runtime.planner import plan
    from lsaq_runtime.probe import Device

    dev = Device(provider, 0 if provider == "cuda" else None, "simulated", 1 << 50, 1 << 50, "study")
    return sorted(r.need_bytes for r in plan(manifest, dev).rows if r.need_bytes)


def _default_budgets(needs: list[int]) -> list[int]:
    """Just under the smallest need, six steps from the smallest mix's need to INT8's (where
    the mixes differ), one between INT8 and FP16, and FP16's need."""
    lo, int8, fp16 = needs[0], needs[-2], needs[-1]
    return ([int(lo * 0.97)] + [int(lo + (int8 - lo) * i / 5) for i in range(6)]
            + [(int8 + fp16) // 2, fp16])


def _bits(b) -> str:
    return f"{b:.2f}" if b else "-"


def _mib(n):
    return f"{n / 2**20:,.0f} MiB"


def render_report(s: dict) -> str:
    metrics = s["metrics"]
    lines = [f"# LSAQ study: {s['model']}", "",
             f"Command: `{s['command']}`  ", f"Wall time: {s['seconds']:.0f} s on this machine.", "",
             f"Perplexity of each variant's ONNX graph (ONNX Runtime, CPU provider, float32 "
             f"activations) on `{Path(s['text']['source']).name}`: {s['text']['windows']} windows of "
             f"{s['text']['seq_len']} tokens. Calibration: {s['calibration']['samples']} windows of "
             f"{s['calibration']['seq_len']} tokens of `{Path(s['calibration']['source']).name}`.", "",
             "## Perplexity against average bits (the paper's Table III)", "",
             "| metric | " + " | ".join(PAPER_POINTS) + " |", "|---" * (len(PAPER_POINTS) + 1) + "|"]
    for m in metrics:
        cells = [f"{s['results'][m][p]['perplexity']:.3f}" for p in PAPER_POINTS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    bits = [f"{s['results'][metrics[0]][p]['avg_bits']:.2f} ({s['results'][metrics[0]][p]['avg_bits_nominal']:.0f})"
            for p in PAPER_POINTS]
    lines += ["| avg bits, real (nominal) | " + " | ".join(bits) + " |", "",
              "The 25/50/75% columns put INT4 on that share of layers, least important first by each "
              "metric; INT8 elsewhere. Real bits count the stored scales.", "",
              "![perplexity vs bits](perplexity_vs_bits.png)", "", "![importance](importance.png)", "",
              "## ONNX against the torch reference of the same plan", "",
              "| plan | ONNX ppl | torch ppl | relative difference |", "|---|---|---|---|"]
    seen = set()
    for m in metrics:
        for p in PAPER_POINTS:
            r = s["results"][m][p]
            key = (r["bundle"], r["variant"])
            if key in seen or not r["reference"]:
                continue
            seen.add(key)
            ref = r["reference"]
            lines.append(f"| {r['bundle']}/{r['variant']} | {ref['onnx']:.4f} | {ref['torch']:.4f} | "
                         f"{100 * ref['rel_diff']:.3f}% |")
    if seen:
        w = next(iter(s["results"][metrics[0]].values()))["reference"]["windows"]
        lines += ["", f"(on the first {w} windows)"]
    for prov, rows in s["budgets"].items():
        lines += ["", f"## Which variant a memory budget gets ({prov} provider, context "
                      f"from the profile; the paper's Table IV)", "",
                  "| budget | variant | FP16 | INT8 | INT4 | avg bits | need |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["counts"] or {"fp16": "-", "int8": "-", "int4": "-"}
            lines.append(f"| {_mib(r['budget'])} | {r['variant'] or 'none fits'} | {c['fp16']} | {c['int8']} | "
                         f"{c['int4']} | {_bits(r['avg_bits'])} | {_mib(r['need'])} |")
    return "\n".join(lines) + "\n"
