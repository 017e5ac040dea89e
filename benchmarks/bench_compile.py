"""What a build costs at real models' widths: wall time, CPU seconds, peak anonymous memory (and
GPU memory where NVML sees one), per profile, measured from outside the build's process.

    python benchmarks/bench_compile.py --shape llama-2-7b:2,4 --shape llama-3-8b:2,4 \
        --profile paper --profile default [--build-arg=--device=cuda] [--out FILE.md]

Each `--shape NAME:L1,L2` builds random-weight checkpoints of that model's shapes
(benchmarks/checkpoints.py: the published config's width, heads, vocabulary) with L1 and L2
decoder layers, and compiles each with every profile in a fresh process. A full-depth build is
the same command with the real depth (`llama-2-7b:32`); where that does not fit the time here,
the two depths give a per-layer cost and a fixed cost (embedding, head, calibration, process
start), and the table extrapolates wall, CPU seconds and memory to the real depth. A memory
slope above zero means the build holds something per layer: the extrapolated peak is then
what the full model would need. Random weights: nothing here says anything about quality.
"""

from __future__ import annotations

import argparse
import os
import re
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import (REPO, SHAPES, checkpoint, cpu_description, layer_params, log,  # noqa: E402
                         measure, table_params)


def torch_gpu_mib(log_text: str) -> str | None:
    """The peak GPU memory torch allocated, as the build reports it on its last line."""
    m = re.search(r"GPU memory: peak ([\d,]+) MiB allocated", log_text)
    return m.group(1) if m else None


def bundle_gib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30 if path.exists() else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", required=True, help="NAME:L1[,L2] (names: "
                    + ", ".join(SHAPES) + ")")
    ap.add_argument("--profile", action="append", default=None, help="default | paper | exact | FILE")
    ap.add_argument("--build-arg", action="append", default=[], help="extra argument for every build")
    ap.add_argument("--workdir", default="/tmp/lsaq-bench-compile")
    ap.add_argument("--stop-above", type=float, default=20.0,
                    help="GiB of anonymous memory at which a build is stopped (the row says so)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and bundles")
    ap.add_argument("--out", help="also write the tables (markdown) here")
    args = ap.parse_args()
    profiles = args.profile or ["paper", "default"]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "runtime")])}
    # Each row measures the build from scratch: a measurement kept by an earlier row or run
    # (measurements.py) would otherwise be reused.
    env["LSAQ_CACHE_DIR"] = str(work / "cache")
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    rows = []
    for spec in args.shape:
        name, _, depths = spec.partition(":")
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r}; choose from {', '.join(SHAPES)}")
        shape = SHAPES[name]
        for layers in [int(x) for x in (depths or str(shape["num_hidden_layers"])).split(",")]:
            ckpt = checkpoint(work / f"{name}-{layers}L", shape, layers)
            for prof in profiles:
                out = work / f"bundle-{name}-{layers}L-{Path(prof).stem}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [sys.executable, "-m", "lsaq_compile.cli", "build", str(ckpt), "-o", str(out),
                       "--profile", prof, "--remeasure", *args.build_arg]
                log(f"{name} x {layers} layers, profile {prof}")
                build_log = work / f"build-{name}-{layers}L-{Path(prof).stem}.log"
                c = measure(cmd, env=env, stop_above_gib=args.stop_above, log_path=build_log)
                status = c.stopped or ("ok" if c.rc == 0 else
                                       f"failed (exit {c.rc}): {c.stderr_tail.strip().splitlines()[-1:]}")
                rows.append(dict(shape=name, layers=layers, profile=Path(prof).stem, wall=c.wall_s,
                                 cpu=c.cpu_s, anon=c.peak_anon_mib, gpu=c.peak_gpu_mib,
                                 gib=bundle_gib(out), status=status,
                                 torch_gpu=torch_gpu_mib(build_log.read_text()),
                                 stages=stage_seconds(build_log.read_text())))
                log(f"  {c.wall_s:.0f} s wall, {c.cpu_s:.0f} CPU s, peak anon {c.peak_anon_mib:,.0f} MiB: {status}")
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(ckpt, ignore_errors=True)
    lines = [f"Machine: {platform.machine()}, {cpu_description()}, {os.cpu_count()} logical CPUs, "
             "load average at the "
             f"start {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f}, at the end "
             f"{os.getloadavg()[0]:.1f}; total {(time.perf_counter() - t0) / 60:.0f} min. Random "
             "weights with the published shapes (benchmarks/checkpoints.py).", "",
             "Command: `python benchmarks/bench_compile.py " + " ".join(sys.argv[1:]) + "`", "",
             "| shape | layers | profile | wall s | CPU s | peak anonymous MiB | peak GPU MiB | bundle GiB | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gpu = f"{r['gpu']:,.0f}" if r["gpu"] is not None else "-"
        if r.get("torch_gpu"):   # the build's own report: NVML counts the context and others
            gpu += f" (torch {r['torch_gpu']})"
        lines.append(f"| {r['shape']} | {r['layers']} | {r['profile']} | {r['wall']:.0f} | {r['cpu']:.0f} | "
                     f"{r['anon']:,.0f} | {gpu} | {r['gib']:.2f} | {r['status']} |")
    ext = extrapolate(rows)
    if ext:
        lines += ["", "Extrapolated to the real depth from the two measured depths (cost = fixed + "
                  "per layer x layers; memory likewise, so a slope above zero is memory the build "
                  "holds per layer):", "",
                  "| shape | real layers | params | profile | wall min | CPU min | per layer: wall s / CPU s / anon MiB | peak anonymous GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += ext
    lines += stage_table(rows)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


# "[  12.3s] stage: ..." or, for a stage's layer sweeps, "[  12.3s] stage: sweep: layer 3/32 ..."
PROGRESS = re.compile(r"^\[\s*([0-9.]+)s\] (?:([a-z0-9 -]+?)(?: \d+/\d+)?: (?:([a-z0-9 ]+): layer )?)?")


def stage_seconds(text: str) -> dict[str, float]:
    """Wall seconds of each stage of one build, from its progress lines ("[  12.3s] stage: ..."):
    most lines report work just finished ("layer 3/32 (6.7s)"), so the time since the previous
    line is counted to the stage of the line that ends it. Repeated stages add up."""
    marks = [(float(m[1]), "/".join(filter(None, (m[2] or "other", m[3]))))
             for m in map(PROGRESS.match, text.splitlines()) if m]
    out: dict[str, float] = {}
    for (t_prev, _), (t, name) in zip([(0.0, "")] + marks, marks):
        out[name] = out.get(name, 0.0) + t - t_prev
    return out


def stage_table(rows: list[dict]) -> list[str]:
    """Where each build's wall time went, by stage (the two depths' difference is the per-layer
    cost of each stage)."""
    names = list(dict.fromkeys(n for r in rows for n in r["stages"]))
    if not names:
        return []
    out = ["", "Wall seconds by stage (from each build's progress lines):", "",
           "| shape | layers | profile | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = [f"{r['stages'][n]:.0f}" if n in r["stages"] else "-" for n in names]
        out.append(f"| {r['shape']} | {r['layers']} | {r['profile']} | " + " | ".join(cells) + " |")
    return out


def extrapolate(rows: list[dict]) -> list[str]:
    out = []
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            keyed.setdefault((r["shape"], r["profile"]), []).append(r)
    for (name, prof), rs in keyed.items():
        rs = sorted(rs, key=lambda r: r["layers"])
        if len(rs) < 2 or rs[0]["layers"] == rs[-1]["layers"]:
            continue
        a, b = rs[0], rs[-1]
        shape = SHAPES[name]
        depth = shape["num_hidden_layers"]
        dl = b["layers"] - a["layers"]
        per = {k: (b[k] - a[k]) / dl for k in ("wall", "cpu", "anon")}
        full = {k: a[k] + per[k] * (depth - a["layers"]) for k in per}
        params = layer_params(shape) * depth + table_params(shape)
        out.append(f"| {name} | {depth} | {params / 1e9:.1f}B | {prof} | {full['wall'] / 60:.0f} | "
                   f"{full['cpu'] / 60:.0f} | {per['wall']:.1f} / {per['cpu']:.1f} / {per['anon']:,.0f} | "
                   f"{max(full['anon'], b['anon']) / 1024:.1f} |")
    return out


if __name__ == "__main__":
    main()
