"""Predicted vs measured memory of `lsaq-run --device cpu` (a benchmark, not a test).

For each variant (FP16, INT8, smallest mix) and context (512, 2048) it runs lsaq-run in a fresh
process with a prompt that fills the context (prompt = context - new tokens) and reads the child's
peak resident set size (its VmHWM, which it traces with LSAQ_MEMORY_TRACE=1). The KV cache is allocated and touched for the whole context
at load, and the prefill of a context-length prompt exercises the largest workspace, so the
measurement covers everything the prediction counts.

    python benchmarks/bench_memory.py --bundle BUNDLE     (without --bundle: builds the default
                                                          model's bundle once into --cache)
The prediction is the planner's need without the safety margin; the goals: |ratio - 1| <= 15%,
and the need with the margin (what the planner compares with free memory) never below the
measured peak. `--large-vocab DIR` measures instead a tiny random model with a 262,144-token
vocabulary and tokenizer (built once into DIR with the test suite's factories), where the
vocabulary-sized terms (tokenizer, tables and their copies) dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "runtime"), str(REPO)]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO)]),
       "LSAQ_MEMORY_TRACE": "1"}  # the child logs RSS after each stage: the breakdown below
TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw-test.txt"

from lsaq_runtime import decide, load_manifest  # noqa: E402
from lsaq_runtime.planner import precision_key  # noqa: E402
from lsaq_runtime.sizes import format_size  # noqa: E402
from lsaq_runtime.text import TextCodec  # noqa: E402


def ensure_bundle(path: Path | None, cache: Path) -> Path:
    if path:
        return path
    if not (cache / "manifest.json").is_file():
        print(f"building the default bundle into {cache} (once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "lsaq_compile.cli", "build", "-o", str(cache), "--force"],
                       check=True, env=ENV)
    return cache


def large_vocab_bundle(cache: Path) -> Path:
    """The suite's large-vocabulary model (tests/conftest.py), built into cache/bundle once."""
    if (cache / "bundle" / "manifest.json").is_file():
        return cache / "bundle"
    sys.path.insert(0, str(REPO / "tests"))
    from factories.bundles import small_profile
    from factories.models import make_large_vocab_model
    from lsaq_compile.bundle import build_bundle
    from lsaq_compile.progress import Progress

    src = make_large_vocab_model(cache / "hf")
    prof = small_profile(samples=2, seq_len=64)
    prof.build.rungs, prof.build.refine, prof.build.quality_samples = 2, 0, 2
    print(f"building the large-vocabulary bundle into {cache / 'bundle'} (once)", file=sys.stderr)
    return build_bundle(src, cache / "bundle", profile=prof, force=True, progress=Progress())


def prompt_of(codec: TextCodec, tokens: int) -> tuple[str, int]:
    """Text that encodes to at most `tokens` tokens (as close as re-tokenization allows)."""
    source = TEXT.read_text(encoding="utf-8") if TEXT.is_file() else "The quick brown fox. " * 20000
    ids = codec.encode(source[: tokens * 12])
    k = tokens
    while True:
        text = codec.decode(ids[:k])
        n = len(codec.encode(text))
        if n <= tokens:
            return text, n
        k -= n - tokens


def measure(bundle: Path, variant: str, context: int, prompt: str, new_tokens: int) -> tuple[int, float, str]:
    """Peak RSS (bytes) of one lsaq-run process, its wall time, and its stderr."""
    cmd = [sys.executable, "-m", "lsaq_runtime.cli", str(bundle), "-", "--device", "cpu",
           "--variant", variant, "--context", str(context), "--max-new-tokens", str(new_tokens)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.TemporaryFile() as inp:
        inp.write(prompt.encode())
        inp.seek(0)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=inp, stdout=out, stderr=err, env=ENV)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if p.returncode != 0:
        raise SystemExit(f"lsaq-run failed ({p.returncode}) for {variant} @ {context}:\n{stderr}")
    # The child's own peak (VmHWM, traced at its end): wait4's ru_maxrss would also count this
    # process's pages, which a child inherits as its high-water mark when it execs.
    peaks = [v[1] for v in stages(stderr).values()]
    return (max(peaks) if peaks else usage.ru_maxrss * 1024), wall, stderr


def stages(stderr: str) -> dict:
    """{stage: (rss, peak)} from the child's `lsaq-memory: STAGE rss=N peak=N` lines."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("lsaq-memory: "):
            stage, rss, peak = line.split()[1:4]
            out[stage] = (int(rss.split("=")[1]), int(peak.split("=")[1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: build the default model's)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lsaq-bench-bundle")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--variants", nargs="+", default=None, help="default: fp16 int8 and the smallest mix")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--large-vocab", type=Path, metavar="DIR",
                    help="measure the suite's 262,144-token tiny model, built once into DIR")
    args = ap.parse_args(argv)

    bundle = (large_vocab_bundle(args.large_vocab) if args.large_vocab
              else ensure_bundle(args.bundle, args.cache))
    m = load_manifest(bundle)
    codec = TextCodec(bundle, m)
    ordered = [v["name"] for v in sorted(m["variants"], key=precision_key)]
    variants = args.variants or ["fp16", "int8", ordered[-1]]

    rows = []
    print(f"bundle {bundle} ({m['model']['name']}); prompt fills context - {args.new_tokens} tokens, "
          f"then {args.new_tokens} new tokens; KV allocated for the full context at load")
    head = (f"{'variant':<9} {'context':>7} {'tokens':>7} {'predicted':>10} {'measured':>10} "
            f"{'ratio':>6} {'need':>10}  ok")
    print(head)
    print("-" * len(head))
    for ctx in args.contexts:
        prompt, n_prompt = prompt_of(codec, ctx - args.new_tokens)
        for v in variants:
            d = decide(bundle, context=ctx, device="cpu", variant=v, memory_budget="1TiB",
                       simulate=True, manifest=m)
            predicted, need = d.chosen_row.predicted_bytes, d.chosen_row.need_bytes
            peak, wall, stderr = measure(bundle, v, ctx, prompt, args.new_tokens)
            st = stages(stderr)
            ratio = peak / predicted
            ok = abs(ratio - 1) <= 0.15 and peak <= need
            rows.append({"variant": v, "context": ctx, "prompt_tokens": n_prompt,
                         "predicted_bytes": predicted, "need_bytes": need,
                         "measured_peak_rss_bytes": peak, "ratio": round(ratio, 4),
                         "within_15pct": abs(ratio - 1) <= 0.15, "never_under": peak <= need,
                         "wall_s": round(wall, 2),
                         "breakdown": {k: getattr(d.chosen_row, k) for k in
                                       ("resident_bytes", "kv_bytes", "workspace_bytes",
                                        "overhead_bytes", "creation_bytes")},
                         "measured_stages": st})
            print(f"{v:<9} {ctx:>7} {n_prompt + args.new_tokens:>7} {format_size(predicted):>10} "
                  f"{format_size(peak):>10} {ratio:>6.3f} {format_size(need):>10}  "
                  f"{'yes' if ok else 'NO'}", flush=True)
    print("\nwhere the memory goes (MiB; measured as RSS growth between stages vs the prediction):")
    print(f"{'variant':<9} {'context':>7} {'base':>12} {'weights':>14} {'kv':>12} {'prefill':>12} {'creation peak':>14}")
    mib = lambda n: f"{n / 2**20:.0f}"  # noqa: E731
    for r in rows:
        st, b = r["measured_stages"], r["breakdown"]
        if not {"start", "session", "kv", "prefill"} <= set(st):
            continue
        base, sess, kv, pre = (st[k][0] for k in ("start", "session", "kv", "prefill"))
        print(f"{r['variant']:<9} {r['context']:>7} {mib(base):>5}/{mib(b['overhead_bytes']):>6} "
              f"{mib(sess - base):>6}/{mib(b['resident_bytes']):>7} {mib(kv - sess):>5}/{mib(b['kv_bytes']):>6} "
              f"{mib(pre - kv):>5}/{mib(b['workspace_bytes']):>6} {mib(st['session'][1] - base):>14}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if not r["within_15pct"]]
    under = [r for r in rows if not r["never_under"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} rows within ±15%; "
          f"{len(rows) - len(under)}/{len(rows)} with the need (margin included) at or above "
          "the measured peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
