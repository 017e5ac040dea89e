"""Export streams: peak memory of `lsaq-compile export` on a 7B-shaped bundle (a benchmark).

    python benchmarks/bench_export_stream.py --workdir /tmp/lsaq-7b [--layers 32] [--keep]

1. A random-weight checkpoint with Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads,
   32 layers, vocabulary 32000), float16 safetensors, one shard per layer, written a tensor at a
   time; a small trained BPE tokenizer.
2. `lsaq-compile build --profile paper --scores S` (the paper's per-channel INT8/INT4 ladder;
   the scores are given, a fixed order, because what is measured is the export, not the order).
3. `lsaq-compile export` of INT8 and of a mix to GGUF and to compressed-tensors, each in a fresh
   process whose peak resident memory (ru_maxrss of the child) is read after it exits.
The table puts each peak beside the bundle's size, the variant's weight bytes and the largest
single tensor: an export that held the model would peak above the variant's weight bytes.
Everything is deleted at the end unless --keep (about 60 GB at 32 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "runtime"), str(REPO / "tests")]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkpoints import SHAPES, checkpoint, log  # noqa: E402


def peak_of(cmd: list[str]) -> tuple[float, float, str]:
    """(peak resident MiB of the child, seconds, its stdout) of one command in a fresh process."""
    probe = ("import resource, subprocess, sys, time\n"
             "t = time.perf_counter()\n"
             "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "sys.stderr.write(r.stderr)\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
             "time.perf_counter() - t, r.returncode)\n"
             "print(r.stdout)")
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'runtime'}"}
    r = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, env=env)
    first, *rest = r.stdout.splitlines()
    kib, secs, rc = first.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    return int(kib) / 1024, float(secs), "\n".join(rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lsaq-7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    lsaq = [py, "-m", "lsaq_compile.cli"]
    t0 = time.perf_counter()
    ckpt = checkpoint(work / "ckpt", SHAPES["llama-2-7b"], args.layers)
    scores = work / "scores.json"
    scores.write_text(json.dumps({"metric": "jaccard", "params": {"k": 10, "final_norm": False},
                                  "calibration": None, "model": {},
                                  "importance": [float(i) for i in range(args.layers)],
                                  "order": list(range(args.layers))}))
    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        log("building the bundle (paper profile, given scores)")
        rss, secs, _ = peak_of([*lsaq, "build", str(ckpt), "-o", str(bundle), "--profile", "paper",
                                "--scores", str(scores), "--force", "-q"])
        log(f"build: peak {rss:,.0f} MiB, {secs:.0f}s")
    m = json.loads((bundle / "manifest.json").read_text())
    bundle_bytes = sum(f["bytes"] for f in m["files"])
    largest = 0
    for f in (bundle / "weights").glob("*.safetensors"):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(n))
        largest = max([largest] + [e["data_offsets"][1] - e["data_offsets"][0]
                                   for k, e in hdr.items() if k != "__metadata__"])
    names = [v["name"] for v in m["variants"]]
    mixes = [n for n in names if n not in ("fp16", "int8", "int4")]
    rows = []
    for v in ["int8", mixes[len(mixes) // 2] if mixes else "int4"]:
        wb = next(x for x in m["variants"] if x["name"] == v)["weight_bytes"]
        for target, out in (("gguf", work / f"{v}.gguf"), ("compressed-tensors", work / f"{v}-ct")):
            log(f"export {v} -> {target}")
            rss, secs, text = peak_of([*lsaq, "export", str(bundle), "--variant", v, "--to", target,
                                       "-o", str(out), "--force", "-q"])
            size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.iterdir())
            rows.append((v, target, rss, secs, size, wb))
            log(f"{v} {target}: peak {rss:,.0f} MiB, {secs:.0f}s, wrote {size / 2**30:.2f} GiB")
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink()
            if out.with_suffix(".Modelfile").exists():
                out.with_suffix(".Modelfile").unlink()
    lines = [f"Checkpoint: random weights, Llama-2-7B shapes ({args.layers} layers, hidden 4096, MLP "
             f"11008, vocabulary 32000); bundle {bundle_bytes / 2**30:.1f} GiB "
             f"({len(names)} variants: {', '.join(names)}); largest stored tensor "
             f"{largest / 2**20:,.0f} MiB. Total {(time.perf_counter() - t0) / 60:.0f} min.", "",
             "| variant | to | peak resident MiB (whole process) | variant weight GiB | "
             "written GiB | seconds |", "|---|---|---|---|---|---|"]
    for v, target, rss, secs, size, wb in rows:
        lines.append(f"| {v} | {target} | {rss:,.0f} | {wb / 2**30:.2f} | {size / 2**30:.2f} | {secs:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
