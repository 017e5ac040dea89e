"""The paper's comparison, on the shipped artifacts: does the Jaccard order (LSAQ) lose less
than LWQ's orders (cosine, z-score) at the same average bits, in WikiText-2 perplexity (its
Table III) and in zero-shot accuracy (its Table I)?

One calibration pass scores every metric; one bundle per metric (full ladder, so the memory
table can use every mix; the paper's points only with `quick`). FP16, INT8 and all-INT4 are the
same plan under every metric and are evaluated once. Each plan's ONNX perplexity is
cross-checked against the torch reference of the same dequantized weights on the first
`reference_windows` windows, and FP16's zero-shot scores against real lm-evaluation-harness on
the same items. "best" is, at each mix, the order whose plan has the lowest perplexity on the
calibration windows (never chosen on WikiText or the tasks). Every measurement is recorded in
its bundle's manifest and reused by the next run with the same data and settings.
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


QUICK = {"samples": 8, "seq_len": 128, "eval_seq_len": 512, "windows": 2, "reference_windows": 0,
         "items": 10, "select_windows": 2, "ladder": "paper"}
MIXES = ("25%", "50%", "75%")


def run_study(model=None, metrics=("jaccard", "cosine", "zscore"), text=None, out_dir="docs/results",
              bundles_dir=None, calibration=None, samples=32, seq_len=256, k=10, final_norm=False,
              eval_seq_len=1024, windows=16, reference_windows=4, budgets=None, force=False,
              progress: Progress | None = None, tasks_dir=None, tasks=None, items: int | None = 200,
              select_windows: int = 8, cross_check: bool = True, ladder: str = "full",
              quick: bool = False) -> Path:
    """`items`: the first N questions of each zero-shot task (None: all); `tasks_dir` None skips
    Table I. `quick` overrides the sizes with QUICK (minutes, for tests)."""
    from . import evaluate as ev
    from .bundle import build_bundle, read_manifest
    from .calibration import load_calibration, load_tokenizer
    from .importance import score_model
    from .model_source import open_model
    from .plots import plot_importance, plot_quality_vs_bits, plot_zeroshot_vs_bits
    from .profiles import load_profile
    from . import zeroshot as zs

    progress = progress or Progress()
    if text is None:
        raise LsaqError("the study needs --text FILE (evaluation text, e.g. WikiText-2 test)")
    if quick:
        samples, seq_len, eval_seq_len, windows, reference_windows, items, select_windows, ladder = (
            QUICK[k_] for k_ in ("samples", "seq_len", "eval_seq_len", "windows", "reference_windows",
                                 "items", "select_windows", "ladder"))
    task_names = zs.parse_tasks(tasks or "all") if tasks_dir else []
    for t in task_names:   # fail on a bad data folder before an hour of work, not after
        zs.load_docs(t, tasks_dir)
    t_start = time.perf_counter()
    _COUNTS.update(measurements=0, reused=0)
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
    # The paper's quantizer (per-channel RTN) and selection rule (most precise that fits).
    profile = load_profile("paper")
    profile.build.ladder, profile.build.quality_samples = ladder, 0
    manifests, bundles = {}, {}
    for metric in metrics:
        b = bundles_dir / metric
        reuse = False
        if b.exists() and not force:
            try:
                old = read_manifest(b)
                reuse = old["scores"]["order"] == list(scores[metric].order) and \
                    old["scores"].get("calibration") == scores[metric].to_json().get("calibration") and \
                    len(old["variants"]) == len(_ladder_plans(old, ladder))
            except Exception:
                reuse = False
        if not reuse:
            progress(f"building the {metric} bundle")
            build_bundle(source.path, b, profile=profile, scores=scores[metric],
                         force=True, progress=Progress(quiet=True))
        else:
            progress(f"reusing {b} (same scores)")
        bundles[metric], manifests[metric] = b, read_manifest(b)

    # 3. evaluate each distinct plan once: perplexity (ONNX on every window, torch on the first
    #    few), perplexity on the calibration windows (to pick "best"), the zero-shot tasks
    m0 = manifests[metrics[0]]
    codec = ev.bundle_codec(bundles[metrics[0]], m0)   # one model: one tokenizer, one framing
    tw = ev.text_windows(text, codec, eval_seq_len, windows)
    encode = ev.encoder(codec)
    sel = ev.TextWindows(calib.source, calib.sha256, calib.seq_len,
                         calib.windows[:: max(1, len(calib.windows) // select_windows)][:select_windows],
                         calib.samples * calib.seq_len)
    task_sha = {t: _files_sha(zs, t, tasks_dir) for t in task_names}
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
                                            eval_seq_len, reference_windows, source.path, q, progress,
                                            sel, task_names, tasks_dir, items, task_sha, encode)
            results[metric][point] = cache[key]
    # "best": at each mix, the order with the lowest calibration perplexity
    results["best"] = {p: results[metrics[0]][p] for p in PAPER_POINTS}
    for p in MIXES:
        results["best"][p] = min((results[m][p] for m in metrics), key=lambda r: r["select_nll"])

    # 4. FP16 through real lm-evaluation-harness on the same items
    xcheck = None
    if task_names and cross_check:
        xcheck = _cross_check(bundles[metrics[0]], results[metrics[0]]["fp16"], task_names, tasks_dir,
                              items, progress)

    # 5. which variant each memory budget gets (the paper's Table IV), from the jaccard bundle
    mj = manifests["jaccard" if "jaccard" in manifests else metrics[0]]
    budget_rows = {}
    for prov in ("cpu", "cuda"):
        bl = budgets or _default_budgets(_needs(mj, prov))
        budget_rows[prov] = _budget_table(mj, bl, prov)

    plot_quality_vs_bits(results, out_dir / "perplexity_vs_bits.png")
    if task_names:
        plot_zeroshot_vs_bits(results, task_names, out_dir / "zeroshot_vs_bits.png")
    summary = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "model": m0["model"]["name"], "metrics": list(metrics), "quick": quick,
        "calibration": scores[metrics[0]].to_json().get("calibration"),
        "scores": {m: {"importance": list(scores[m].importance), "order": list(scores[m].order)}
                   for m in metrics},
        "text": {"source": tw.source, "sha256": tw.sha256, "seq_len": eval_seq_len,
                 "windows": len(tw.windows)},
        "selection": {"windows": len(sel.windows), "seq_len": sel.seq_len},
        "tasks": {"names": task_names, "dir": str(tasks_dir) if tasks_dir else None,
                  "items_per_task": items, "sha256": task_sha},
        "results": results, "cross_check": xcheck, "budgets": budget_rows,
        "seconds": round(time.perf_counter() - t_start, 1),
        "measurements": dict(_COUNTS),
    }
    summary["verdict"] = verdict(summary)
    (out_dir / "results.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "report.md").write_text(render_report(summary))
    progress(f"study written to {out_dir} in {summary['seconds']:.0f}s")
    return out_dir


def _ladder_plans(manifest: dict, ladder: str) -> list:
    from .plan import ladder as make_ladder

    return make_ladder(list(manifest["scores"]["order"]), ladder)


def _files_sha(zs, task: str, tasks_dir) -> str:
    import hashlib

    from .evaluate import file_sha256

    h = hashlib.sha256()
    for f in zs.TASKS[task].files:
        h.update(file_sha256(Path(tasks_dir) / f).encode())
    return h.hexdigest()


def _recorded(manifest: dict, variant: str, engine: str, data_sha: str, settings: dict,
              kind: str = "perplexity", need: str = "per_window_nll"):
    """A result already measured on this bundle with the same data and settings."""
    for e in manifest.get("evaluations", []):
        if (e.get("kind"), e.get("variant"), e.get("engine"), e.get("data_sha256")) == \
                (kind, variant, engine, data_sha) and e.get("settings") == settings and need in e:
            return e
    return None


_COUNTS = {"measurements": 0, "reused": 0}


def _measure(ev, bundle, manifest, entry: dict, need: str, run, progress, name) -> dict:
    """The recorded entry with this key, or run() it and record it."""
    e = _recorded(manifest, entry["variant"], entry["engine"], entry["data_sha256"], entry["settings"],
                  entry["kind"], need)
    _COUNTS["measurements"] += 1
    if e is not None:
        _COUNTS["reused"] += 1
        progress(f"{name}: reusing the result recorded in {bundle}")
        return e
    e = {**entry, **run()}
    ev.record_evaluations(bundle, [e])
    manifest.setdefault("evaluations", []).append(e)
    return e


def _evaluate_plan(ev, bundle, manifest, v, metric, tw, seq_len, reference_windows, model_path, q,
                   progress, sel, task_names, tasks_dir, items, task_sha, encode) -> dict:
    """ONNX perplexity on every window and the torch reference on the first few, perplexity on
    the selection windows, and the zero-shot tasks, each measured once per bundle."""
    from . import zeroshot as zs

    name = f"{metric}/{v['name']}"
    fn = ev.onnx_logits_fn(bundle, manifest, v["name"], context=max(seq_len, 1024))
    base = {"variant": v["name"], "provider": "cpu", "engine": "onnx"}

    def ppl(text, n, engine, stage):
        def run():
            f = fn if engine == "onnx" else ev.torch_logits_fn(
                model_path, v["precisions"], q["scheme"], q.get("group_size"), q.get("symmetric", True),
                q.get("clip", "none"), q.get("clip_calibration"))
            r = ev.perplexity(f, text, limit=n, progress=progress.stage(f"{stage} {name} [{engine}]"))
            return {"value": r["perplexity"], "tokens": r["tokens"], "per_window_nll": r["per_window_nll"]}
        return _measure(ev, bundle, manifest, {**base, "engine": engine, "kind": "perplexity",
                        "data": text.source, "data_sha256": text.sha256,
                        "settings": {"seq_len": text.seq_len, "windows": n}},
                        "per_window_nll", run, progress, f"eval {name} [{engine}]")

    got = {"onnx": ppl(tw, len(tw.windows), "onnx", "eval")}
    if reference_windows:
        got["torch"] = ppl(tw, reference_windows, "torch", "eval")
    select = ppl(sel, len(sel.windows), "onnx", "calibration ppl")
    ref = None
    if "torch" in got:
        sub = got["onnx"]["per_window_nll"][:reference_windows]
        onnx_sub = math.exp(sum(sub) / len(sub))
        t = got["torch"]["value"]
        ref = {"windows": reference_windows, "onnx": onnx_sub, "torch": t, "rel_diff": abs(onnx_sub - t) / t}
    zero = {}
    for task in task_names:
        def run(task=task):
            r = zs.evaluate_tasks(fn, encode, [task], tasks_dir, items,
                                  progress=progress.stage(f"zero-shot {name}"))[task]
            r.pop("details")
            return r
        zero[task] = _measure(ev, bundle, manifest, {**base, "kind": "zeroshot", "task": task,
                              "data": str(tasks_dir), "data_sha256": task_sha[task],
                              "settings": {"task": task, "items": items}}, "correct", run, progress,
                              f"zero-shot {name} {task}")
    return {"variant": v["name"], "bundle": metric, "avg_bits": v["avg_bits"],
            "avg_bits_nominal": v["avg_bits_nominal"], "layer_counts": v["layer_counts"],
            "perplexity": got["onnx"]["value"], "tokens": got["onnx"]["tokens"], "reference": ref,
            "select_nll": sum(select["per_window_nll"]) / len(select["per_window_nll"]),
            "zeroshot": {t: {k_: z[k_] for k_ in ("items", "acc", "acc_stderr", "acc_norm",
                                                    "acc_norm_stderr", "correct", "correct_norm",
                                                    "chance", "majority") if k_ in z}
                         for t, z in zero.items()}}


def _cross_check(bundle, fp16: dict, task_names, tasks_dir, items, progress) -> dict | None:
    """FP16 through real lm-evaluation-harness (lm_eval_adapter) on the same items: its
    accuracies next to ours, and whether they are identical."""
    import tempfile

    from .zeroshot import agrees

    try:
        from .lm_eval_adapter import zero_shot
    except ImportError as e:
        progress(f"lm-eval cross-check skipped: {e} (pip install -e '.[eval]')")
        return None
    progress("cross-check: FP16 through lm-evaluation-harness on the same items")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        theirs = zero_shot(bundle, fp16["variant"], task_names, tasks_dir, work, items)
    rows = {}
    for t in task_names:
        ours = fp16["zeroshot"][t]
        rows[t] = {"items": theirs[t]["items"],
                   **{f"{k_}_ours": ours.get(k_) for k_ in ("acc", "acc_norm")},
                   **{f"{k_}_lm_eval": theirs[t].get(k_) for k_ in ("acc", "acc_norm")},
                   "identical": agrees(ours, theirs[t])}
    return {"variant": fp16["variant"], "tasks": rows, "seconds": round(time.perf_counter() - t0, 1)}


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


# ---------------------------------------------------------------- statistics and verdict
def avg_acc(r: dict, tasks: list[str]) -> tuple[float, float]:
    """Mean over tasks of acc (the paper's Avg column) and its standard error."""
    z = r["zeroshot"]
    return (sum(z[t]["acc"] for t in tasks) / len(tasks),
            math.sqrt(sum(z[t]["acc_stderr"] ** 2 for t in tasks)) / len(tasks))


def paired_diff(a: dict, b: dict, tasks: list[str]) -> tuple[float, float]:
    """Average accuracy of a minus b over the tasks, with the standard error of that
    difference from the per-question outcomes (both scored the same questions, so the noise
    that is common to both cancels)."""
    import numpy as np

    diff, var = 0.0, 0.0
    for t in tasks:
        d = np.asarray(a["zeroshot"][t]["correct"], float) - np.asarray(b["zeroshot"][t]["correct"], float)
        diff += d.mean()
        var += d.var(ddof=1) / len(d) if len(d) > 1 else 0.0
    return diff / len(tasks), math.sqrt(var) / len(tasks)


def informative_tasks(fp16: dict, tasks: list[str]) -> list[str]:
    """Tasks the FP16 model answers above its best trivial baseline (chance, or always the
    commonest answer) by more than two standard errors."""
    z = fp16["zeroshot"]
    return [t for t in tasks if z[t]["acc"] - max(z[t].get("chance", 0), z[t].get("majority", 0))
            > 2 * z[t]["acc_stderr"]]


def _same_plan(a: dict, b: dict) -> bool:
    return (a["bundle"], a["variant"]) == (b["bundle"], b["variant"]) or \
        (a["variant"] in ("fp16", "int8", "int4") and a["variant"] == b["variant"])


def verdict(s: dict) -> dict:
    """Does the paper's claim hold here? Jaccard against each LWQ order at each mix, in
    perplexity and in average zero-shot accuracy (a difference counts only beyond 2 standard
    errors of the paired difference). Computed from the numbers; the report prints it."""
    res, tasks = s["results"], s["tasks"]["names"]
    if "jaccard" not in res:
        return {"text": "No jaccard order in this study: the paper's claim is not tested."}
    rivals = [m for m in s["metrics"] if m != "jaccard"]
    comp = []
    for p in MIXES:
        for m in rivals:
            a, b = res["jaccard"][p], res[m][p]
            c = {"mix": p, "rival": m, "ppl": a["perplexity"], "ppl_rival": b["perplexity"],
                 "ppl_better": a["perplexity"] < b["perplexity"], "same_plan": _same_plan(a, b)}
            if tasks:
                d, se = paired_diff(a, b, tasks)
                c.update(acc_diff=d, acc_se=se,
                         acc_call="same plan" if c["same_plan"] else
                         "better" if d > 2 * se else "worse" if d < -2 * se else "within noise")
            comp.append(c)
    lines = []
    for m in rivals:
        cs = [c for c in comp if c["rival"] == m]
        won = [c["mix"] for c in cs if c["ppl_better"]]
        detail = ", ".join(f"{c['mix']}: {c['ppl']:.2f} vs {c['ppl_rival']:.2f}" for c in cs)
        lines.append(f"Perplexity: Jaccard's order is lower than {m}'s at {len(won)} of {len(cs)} mixes "
                     f"({detail}).")
        if tasks:
            detail = ", ".join(f"{c['mix']}: {100 * c['acc_diff']:+.1f} ± {100 * c['acc_se']:.1f} "
                               f"({c['acc_call']})" for c in cs)
            lines.append(f"Zero-shot average accuracy, Jaccard minus {m} (points, ± one standard error "
                         f"of the paired difference): {detail}.")
    same = sum(c["same_plan"] for c in comp)
    comp_d = [c for c in comp if not c["same_plan"]]   # an order that picks the same layers ties
    ppl_wins = sum(c["ppl_better"] for c in comp_d)
    parts = [f"Jaccard's order has the lower perplexity in {ppl_wins} of {len(comp_d)} comparisons"
             + (f" ({same} more pick the same layers)" if same else "")]
    if tasks:
        calls = [c["acc_call"] for c in comp_d]
        parts.append(f"in zero-shot accuracy it is better beyond noise in {calls.count('better')}, "
                     f"worse beyond noise in {calls.count('worse')}, and within noise in "
                     f"{calls.count('within noise')}")
    holds = bool(comp_d) and ppl_wins == len(comp_d) and \
        (not tasks or all(c["acc_call"] != "worse" for c in comp_d))
    summary = ("; ".join(parts) + ". The claim (Jaccard loses less than LWQ's orders at the same bits) "
               + ("holds here." if holds else "holds only in part here." if ppl_wins
                  else "is not supported here."))
    informative = informative_tasks(res[s["metrics"][0]]["fp16"], tasks) if tasks else []
    if tasks and informative and len(informative) < len(tasks):
        from .zeroshot import TASKS

        rest = [TASKS[t].title for t in tasks if t not in informative]
        names = " and ".join(TASKS[t].title for t in informative)
        lines.append(f"Only {names} are answered at FP16 above their best trivial baseline (chance, or "
                     f"always the commonest answer) by more than two standard errors; on "
                     f"{', '.join(rest)} this model is at or below it, so differences there mostly move "
                     f"its answer bias, not its knowledge.")
        for m in rivals:
            cs = []
            for p in MIXES:
                d, se = paired_diff(res["jaccard"][p], res[m][p], informative)
                call = "better" if d > 2 * se else "worse" if d < -2 * se else "within noise"
                cs.append(f"{p}: {100 * d:+.1f} ± {100 * se:.1f} ({call})")
            lines.append(f"On {names} alone, Jaccard minus {m}: {', '.join(cs)}.")
    if tasks:
        f, i8 = res[s["metrics"][0]]["fp16"], res[s["metrics"][0]]["int8"]
        d, se = paired_diff(i8, f, tasks)
        n = min(f["zeroshot"][t]["items"] for t in tasks)
        summary += (f" With {n}+ questions per task, one standard error of a task's accuracy is about "
                    f"{100 * max(f['zeroshot'][t]['acc_stderr'] for t in tasks):.1f} points; INT8 against "
                    f"FP16 differs by {100 * d:+.1f} ± {100 * se:.1f} points on average.")
    return {"comparisons": comp, "lines": lines, "text": summary, "holds": holds}


def render_report(s: dict) -> str:
    metrics = s["metrics"]
    orders = metrics + (["best"] if "best" in s["results"] else [])
    tasks = s["tasks"]["names"] if s.get("tasks") else []
    lines = [f"# LSAQ study: {s['model']}", "",
             f"Command: `{s['command']}`  ", f"Wall time: {s['seconds']:.0f} s on this machine"
             + _reuse_note(s.get("measurements"))
             + (" (--quick: small sizes, for tests; not a result)." if s.get("quick") else "."), "",
             f"Every number comes from running each variant's ONNX graph in ONNX Runtime (CPU "
             f"provider, float32 activations). Perplexity: `{Path(s['text']['source']).name}`, "
             f"{s['text']['windows']} windows of {s['text']['seq_len']} tokens. Calibration: "
             f"{s['calibration']['samples']} windows of {s['calibration']['seq_len']} tokens of "
             f"`{Path(s['calibration']['source']).name}`. The 25/50/75% rows put INT4 on that share "
             f"of layers, least important first by each metric, INT8 elsewhere. \"best\" is, at each "
             f"mix, the order whose plan has the lowest perplexity on {s['selection']['windows']} of "
             f"the calibration windows (chosen before WikiText or the tasks are looked at).", ""]
    if tasks:
        v = s["verdict"]
        lines += ["## Does the paper's claim hold here?", "", v["text"], ""] + \
                 [f"- {x}" for x in v["lines"]] + [""]
    lines += ["## Perplexity against average bits (the paper's Table III)", "",
              "| order | " + " | ".join(PAPER_POINTS) + " |", "|---" * (len(PAPER_POINTS) + 1) + "|"]
    for m in orders:
        cells = [f"{s['results'][m][p]['perplexity']:.3f}" for p in PAPER_POINTS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if "best" in s["results"]:
        lines.append("| best picks | | | " + " | ".join(s["results"]["best"][p]["bundle"] for p in MIXES)
                     + " | |")
    bits = [f"{s['results'][metrics[0]][p]['avg_bits']:.2f} ({s['results'][metrics[0]][p]['avg_bits_nominal']:.0f})"
            for p in PAPER_POINTS]
    lines += ["| avg bits, real (nominal) | " + " | ".join(bits) + " |", "",
              "Real bits count the stored scales.", "",
              "![perplexity vs bits](perplexity_vs_bits.png)", "", "![importance](importance.png)", ""]
    if tasks:
        lines += _table_one(s, orders, tasks)
    refs, seen = [], set()
    for m in metrics:
        for p in PAPER_POINTS:
            r = s["results"][m][p]
            key = (r["bundle"], r["variant"])
            if key in seen or not r["reference"]:
                continue
            seen.add(key)
            ref = r["reference"]
            refs.append(f"| {r['bundle']}/{r['variant']} | {ref['onnx']:.4f} | {ref['torch']:.4f} | "
                        f"{100 * ref['rel_diff']:.3f}% |")
    if refs:
        w = next(iter(s["results"][metrics[0]].values()))["reference"]["windows"]
        lines += ["## ONNX against the torch reference of the same plan", "",
                  "| plan | ONNX ppl | torch ppl | relative difference |", "|---|---|---|---|"] + refs + \
                 ["", f"(on the first {w} windows)"]
    for prov, rows in s["budgets"].items():
        lines += ["", f"## Which variant a memory budget gets ({prov} provider, context "
                      f"from the profile; the paper's Table IV)", "",
                  "| budget | variant | FP16 | INT8 | INT4 | avg bits | need |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            c = r["counts"] or {"fp16": "-", "int8": "-", "int4": "-"}
            lines.append(f"| {_mib(r['budget'])} | {r['variant'] or 'none fits'} | {c['fp16']} | {c['int8']} | "
                         f"{c['int4']} | {_bits(r['avg_bits'])} | {_mib(r['need'])} |")
    return "\n".join(lines) + "\n"


def _reuse_note(c: dict | None) -> str:
    if not c or not c["reused"]:
        return ""
    return (f", with {c['reused']} of its {c['measurements']} measurements read back from the "
            f"bundles' manifests, where an earlier run of this command recorded them")


def _cell(z: dict, key: str) -> str:
    return f"{100 * z[key]:.1f} ± {100 * z[key + '_stderr']:.1f}"


def _table_one(s: dict, orders: list[str], tasks: list[str]) -> list[str]:
    from .zeroshot import TASKS

    res = s["results"]
    first = res[s["metrics"][0]]
    n = {t: first["fp16"]["zeroshot"][t]["items"] for t in tasks}
    lines = ["## Zero-shot accuracy (the paper's Table I)", "",
             "lm-evaluation-harness's prompts and metrics, zero-shot; acc in percent ± one standard "
             "error (lm-eval's: sample std / √n). Questions per task: "
             + ", ".join(f"{TASKS[t].title} {n[t]}" for t in tasks)
             + (" (the first N of each split, as lm-eval's --limit takes them)."
                if s["tasks"]["items_per_task"] else " (the whole split)."), "",
             "| plan | order | " + " | ".join(TASKS[t].title for t in tasks) + " | Avg |",
             "|---" * (len(tasks) + 3) + "|"]

    def row(label, order, r):
        a, se = avg_acc(r, tasks)
        return (f"| {label} | {order} | " + " | ".join(_cell(r["zeroshot"][t], "acc") for t in tasks)
                + f" | {100 * a:.1f} ± {100 * se:.1f} |")
    lines += [row("FP16", "-", first["fp16"]), row("INT8", "-", first["int8"])]
    for p in MIXES:
        for m in orders:
            r = res[m][p]
            lines.append(row(f"{p} INT4", m if m != "best" else f"best (= {r['bundle']})", r))
    lines.append(row("all INT4", "-", first["int4"]))
    norm = [t for t in tasks if "acc_norm" in TASKS[t].metrics]
    if norm:
        lines += ["", "acc_norm (length-normalised, lm-eval's; only these tasks have it):", "",
                  "| plan | order | " + " | ".join(TASKS[t].title for t in norm) + " |",
                  "|---" * (len(norm) + 2) + "|"]
        plans = [("FP16", "-", first["fp16"]), ("INT8", "-", first["int8"])] + \
            [(f"{p} INT4", m, res[m][p]) for p in MIXES for m in s["metrics"]] + [("all INT4", "-", first["int4"])]
        for label, m, r in plans:
            lines.append(f"| {label} | {m} | " + " | ".join(_cell(r["zeroshot"][t], "acc_norm") for t in norm) + " |")
    lines += ["", "Chance and majority baselines of these questions: " + ", ".join(
        f"{TASKS[t].title} {100 * first['fp16']['zeroshot'][t]['chance']:.1f}"
        + (f" (majority {100 * first['fp16']['zeroshot'][t]['majority']:.1f})"
           if first['fp16']['zeroshot'][t]['majority'] > first['fp16']['zeroshot'][t]['chance'] + 0.02 else "")
        for t in tasks) + ".", "",
        "Whether two plans differ is judged on the paired difference (the same questions, "
        "per-question outcomes): see the verdict above. Differences smaller than two of its "
        "standard errors are inside the noise.", "", "![zero-shot vs bits](zeroshot_vs_bits.png)", ""]
    x = s.get("cross_check")
    if x:
        lines += ["## FP16 through real lm-evaluation-harness, same questions", "",
                  f"lm-eval's own task definitions (included from its package, the dataset swapped for "
                  f"the local files) driving this project's adapter on `{x['variant']}` "
                  f"({x['seconds']:.0f} s):", "",
                  "| task | questions | acc (ours) | acc (lm-eval) | acc_norm (ours) | acc_norm (lm-eval) | identical |",
                  "|---|---|---|---|---|---|---|"]
        f = lambda v: "-" if v is None else f"{v:.4f}"
        for t, r in x["tasks"].items():
            lines.append(f"| {TASKS[t].title} | {r['items']} | {f(r['acc_ours'])} | {f(r['acc_lm_eval'])} | "
                         f"{f(r['acc_norm_ours'])} | {f(r['acc_norm_lm_eval'])} | {'yes' if r['identical'] else '**no**'} |")
        lines.append("")
    return lines
