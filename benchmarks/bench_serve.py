"""Load on `lsaq-run serve` over loopback: requests/s, latency, failures, tokens/s (a benchmark,
not a test). Bounded: N clients x M requests each, then it stops by itself.

    python benchmarks/bench_serve.py --bundle BUNDLE [--clients 8] [--requests 20]
        [--max-tokens 32] [--context 512] [--stream] [--memory-budget SIZE]
        [--squeeze SECONDS] [--rounds 1]

It starts the server as a user would (`lsaq-run serve BUNDLE --port 0 ...`, a separate
process), sends one warm-up request, then runs the clients: each is a thread with its own
keep-alive connection sending its requests one after another (greedy chat completions, a
different short question per request). The server generates one request at a time from its
FIFO queue, so with 8 clients about 7 requests wait at any moment: latency is mostly queueing,
and requests/s x tokens per request is the server's generation rate.

--stream also measures the time to the first streamed token. --squeeze SECONDS rewrites the
server's memory budget file every SECONDS, alternating between no limit and the need of a
smaller variant, so the server switches variants under load (the run must still have zero
failures; switches are counted from /metrics). With --rounds N the table gives the median of
N rounds for every column.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), str(REPO)])}
QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.",
    "Why is the sky blue?", "What do bees make?", "How many legs does a spider have?",
    "What is water made of?", "Who wrote Hamlet?", "What is the largest planet?",
    "Give me a word that rhymes with cat.", "What is two plus two?",
    "What language is spoken in Brazil?", "What is the boiling point of water?",
]


class Server:
    def __init__(self, bundle: str, context: int, budget_file: Path | None, threads: int | None,
                 upgrade_after: float, poll: float, budget: str | None = None):
        args = [sys.executable, "-m", "lsaq_runtime.cli", "serve", bundle, "--port", "0",
                "--context", str(context), "--device", "cpu", "--max-queue", "64",
                "--poll", str(poll), "--upgrade-after", str(upgrade_after)]
        if budget_file:
            args += ["--memory-budget-file", str(budget_file)]
        elif budget:
            args += ["--memory-budget", budget]
        if threads:
            args += ["--threads", str(threads)]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines: list[str] = []
        self.url = None
        started = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                m = re.search(r" on http://([\d.]+):(\d+)/v1", line)
                if m:
                    self.host, self.port = m.group(1), int(m.group(2))
                    started.set()
            started.set()
        threading.Thread(target=read, daemon=True).start()
        if not started.wait(300) or self.proc.poll() is not None:
            raise SystemExit("lsaq-run serve did not start:\n" + "\n".join(self.lines))
        self.model = json.loads(self.get("/v1/models"))["data"][0]["id"]

    def get(self, path: str) -> str:
        c = http.client.HTTPConnection(self.host, self.port, timeout=60)
        c.request("GET", path)
        body = c.getresponse().read().decode()
        c.close()
        return body

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in self.get("/metrics").splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def one_request(conn: http.client.HTTPConnection, model: str, question: str, max_tokens: int,
                stream: bool) -> dict:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {})})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    ttft, tokens, variant = None, 0, r.getheader("X-LSAQ-Variant")
    if r.status != 200:
        return {"ok": False, "status": r.status, "error": r.read().decode()[:300],
                "latency": time.perf_counter() - t0}
    if stream:
        ok = False
        for raw in r:   # server-sent events, one "data: ..." line each
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                ok = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return {"ok": False, "status": 200, "error": event["error"]["message"],
                        "latency": time.perf_counter() - t0}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif ttft is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - t0
        r.read()
        if not ok:
            return {"ok": False, "status": 200, "error": "stream ended without [DONE]",
                    "latency": time.perf_counter() - t0}
    else:
        tokens = json.loads(r.read())["usage"]["completion_tokens"]
    return {"ok": True, "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens,
            "variant": variant}


def run_round(srv: Server, clients: int, requests: int, max_tokens: int, stream: bool,
              deadline: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
        for i in range(requests):
            if time.monotonic() > deadline:     # bounded, whatever happens
                res = {"ok": False, "status": None, "error": "deadline", "latency": 0.0}
            else:
                try:
                    res = one_request(conn, srv.model, QUESTIONS[(k * requests + i) % len(QUESTIONS)],
                                      max_tokens, stream)
                except Exception as e:  # a dropped connection is a failed request
                    res = {"ok": False, "status": None, "error": repr(e), "latency": 0.0}
                    conn.close()
                    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
            with lock:
                results.append(res)
        conn.close()

    before = srv.metrics()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = srv.metrics()
    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tokens = sum(r["tokens"] for r in ok)
    gen_s = after["lsaq_generation_seconds_total"] - before["lsaq_generation_seconds_total"]
    gen_tok = after["lsaq_completion_tokens_total"] - before["lsaq_completion_tokens_total"]
    switches = sum(after[k] - before.get(k, 0) for k in after if k.startswith("lsaq_switches_total"))
    failures = [r for r in results if not r["ok"]]
    for f in failures[:5]:
        print(f"failed: {f.get('status')} {f['error']}", file=sys.stderr)
    return {"requests": len(results), "failed": len(failures), "wall_s": wall,
            "req_per_s": len(ok) / wall, "p50_s": float(np.percentile(lat, 50)),
            "p95_s": float(np.percentile(lat, 95)),
            "ttft_p50_s": float(np.median(ttfts)) if ttfts else None,
            "tok_per_s": tokens / wall, "gen_tok_per_s": gen_tok / gen_s if gen_s else 0.0,
            "tokens_per_request": tokens / len(ok) if ok else 0.0, "switches": switches,
            "variants": sorted({r["variant"] for r in ok if r.get("variant")})}


def squeezer(budget_file: Path, small_need: int, every: float, stop: threading.Event):
    """Alternate the budget between no limit and a smaller variant's need."""
    tight = False
    while not stop.wait(every):
        tight = not tight
        tmp = budget_file.with_suffix(".tmp")
        tmp.write_text(str(small_need) if tight else "none")
        os.replace(tmp, budget_file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20, help="per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--stream", action="store_true", help="stream (and time the first token)")
    ap.add_argument("--squeeze", type=float, default=0.0,
                    help="every SECONDS flip the memory budget (variant switches under load)")
    ap.add_argument("--memory-budget", default=None,
                    help="the server's --memory-budget (picks the variant, e.g. 450MiB)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=1800, help="stop sending after SECONDS")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    budget_file = None
    small_need = None
    if args.squeeze:
        plan = subprocess.run([sys.executable, "-m", "lsaq_runtime.cli", args.bundle, "--dry-run",
                               "--json", "--memory-budget", "1TiB", "--context", str(args.context),
                               "--device", "cpu"], capture_output=True, text=True, env=ENV)
        rows = [v for v in json.loads(plan.stdout)["variants"] if v["need_bytes"]]
        small_need = min(r["need_bytes"] for r in rows)
        budget_file = tmp / "budget"
        budget_file.write_text("none")
    srv = Server(args.bundle, args.context, budget_file, args.threads,
                 upgrade_after=args.squeeze / 2 if args.squeeze else 30.0,
                 poll=min(0.5, args.squeeze / 4) if args.squeeze else 2.0,
                 budget=args.memory_budget)
    stop = threading.Event()
    rounds = []
    try:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
        warm = one_request(conn, srv.model, QUESTIONS[0], args.max_tokens, False)
        conn.close()
        if not warm["ok"]:
            raise SystemExit(f"warm-up failed: {warm}")
        if args.squeeze:
            threading.Thread(target=squeezer, args=(budget_file, small_need, args.squeeze, stop),
                             daemon=True).start()
        deadline = time.monotonic() + args.deadline
        for i in range(args.rounds):
            r = run_round(srv, args.clients, args.requests, args.max_tokens, args.stream, deadline)
            rounds.append(r)
            print(f"round {i + 1}: {r['req_per_s']:.2f} req/s, p50 {r['p50_s']:.2f}s, p95 "
                  f"{r['p95_s']:.2f}s, {r['failed']} failed", file=sys.stderr)
    finally:
        stop.set()
        srv.stop()
    switch_lines = [l for l in srv.lines if " switch " in l or "pausing" in l or "resuming" in l]

    def med(key):
        vals = [r[key] for r in rounds if r[key] is not None]
        return statistics.median(vals) if vals else None

    print(f"\nlsaq-run serve, {Path(args.bundle).name}: {args.clients} clients x {args.requests} "
          f"requests, {args.max_tokens} new tokens max, greedy chat, context {args.context}, "
          f"{'streaming' if args.stream else 'not streaming'}"
          f"{f', budget flipped every {args.squeeze:g}s' if args.squeeze else ''}; "
          f"one generation at a time (FIFO); "
          f"{'median of ' + str(len(rounds)) + ' rounds' if len(rounds) > 1 else '1 round'}\n")
    head = ["requests", "failed", "wall s", "requests/s", "p50 latency s", "p95 latency s"]
    if args.stream:
        head.append("p50 first token s")
    head += ["tokens/request", "tokens/s (client)", "tokens/s (server, generating)", "switches",
             "variants"]
    row = [f"{med('requests'):.0f}", f"{sum(r['failed'] for r in rounds)}", f"{med('wall_s'):.1f}",
           f"{med('req_per_s'):.2f}", f"{med('p50_s'):.2f}", f"{med('p95_s'):.2f}"]
    if args.stream:
        t = med("ttft_p50_s")
        row.append(f"{t:.2f}" if t is not None else "-")
    row += [f"{med('tokens_per_request'):.1f}", f"{med('tok_per_s'):.1f}",
            f"{med('gen_tok_per_s'):.1f}", f"{sum(r['switches'] for r in rounds):.0f}",
            ", ".join(sorted({v for r in rounds for v in r["variants"]}))]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| " + " | ".join(row) + " |")
    if switch_lines:
        print(f"\n{len(switch_lines)} switches logged by the server, e.g.:\n  "
              + "\n  ".join(switch_lines[:3]))
    if any(r["failed"] for r in rounds):
        sys.exit(1)


if __name__ == "__main__":
    main()
