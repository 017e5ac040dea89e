"""Soak `lsaq-run serve` under attack and under load, and print what it held.

    python benchmarks/bench_soak.py --bundle B [--seconds 300] [--clients 100] [--slow 1000]

Starts the server itself (a subprocess on loopback) and stops it itself (SIGTERM, graceful).
For --seconds it runs, all at once:

- --clients well-behaved clients, each in a loop: a greedy completion of --max-tokens tokens
  on its own kept-alive HTTP connection, timed from send to the last byte;
- --slow slow connections (slowloris): each sends a request head a byte every few seconds and
  never finishes it; whenever the server closes one (evicted at its connection cap, or no head
  within its header timeout) another is opened, so the attack keeps its size;
- a memory-budget file rewritten every --flip seconds (atomically), alternating between no
  limit and the need of the second-best variant, so the best one stops fitting every other
  flip; every --calm-every seconds it stays unlimited for --calm seconds, long enough for the
  server to switch back up (--upgrade-after), so switches happen in both directions under load.

Reported: requests answered, requests failed beyond the documented 503s (queue_full,
no_variant_fits: must be 0), latency p50/p95/p99, peak RSS and peak open descriptors of the
server (sampled from /proc every 0.25 s; VmHWM for RSS), the server's own counts (switches,
connections it evicted, refused, timed out) and whether its log stayed bounded.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED_503 = {"queue_full", "no_variant_fits"}


def needs(bundle: str, context: int) -> list[tuple[str, int]]:
    """(variant, need bytes) best first, from the runtime's own dry run."""
    r = subprocess.run([sys.executable, "-m", "lsaq_runtime.cli", bundle, "--dry-run", "--json",
                        "--memory-budget", "64GiB", "--context", str(context), "--device", "cpu"],
                       capture_output=True, text=True, env=_env(), timeout=600)
    if r.returncode:
        sys.exit(f"dry run failed: {r.stderr.strip()}")
    return [(v["name"], v["need_bytes"]) for v in json.loads(r.stdout)["variants"]]


def _env() -> dict:
    paths = [str(REPO / "runtime"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


class Server:
    def __init__(self, args, budget: Path):
        cmd = [sys.executable, "-m", "lsaq_runtime.cli", "serve", args.bundle, "--port", "0",
               "--device", "cpu", "--context", str(args.context), "--max-queue",
               str(max(args.clients, 1)), "--wait", "60", "--poll", str(args.poll),
               "--upgrade-after", str(args.upgrade_after), "--memory-budget-file", str(budget)]
        if args.max_connections:
            cmd += ["--max-connections", str(args.max_connections)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=_env())
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 600
        while not any(" on http://" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start:\n" + "\n".join(self.lines))
            time.sleep(0.1)
        m = re.search(r"on http://([\d.]+):(\d+)/v1", next(l for l in self.lines if " on http://" in l))
        self.host, self.port = m.group(1), int(m.group(2))
        self.peak_fds = 0

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def sample(self) -> None:
        try:
            self.peak_fds = max(self.peak_fds, len(os.listdir(f"/proc/{self.proc.pid}/fd")))
        except OSError:
            pass

    def hwm(self) -> int:
        """Peak resident memory of the server process (VmHWM), bytes."""
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def get(self, path: str) -> str:
        c = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            c.request("GET", path)
            return c.getresponse().read().decode()
        finally:
            c.close()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Clients:
    """Well-behaved clients: one kept-alive connection each, one request after another."""

    def __init__(self, server: Server, n: int, model: str, max_tokens: int):
        self.server, self.model, self.max_tokens = server, model, max_tokens
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ok = 0
        self.documented_503 = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def start(self):
        for t in self.threads:
            t.start()

    def _run(self, i: int):
        conn = None
        body = json.dumps({"model": self.model, "prompt": f"Request {i}: the capital of France is",
                           "max_tokens": self.max_tokens, "temperature": 0})
        while not self.stop.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=600)
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                dt = time.perf_counter() - t0
                if r.status == 200:
                    got = json.loads(data)
                    assert got["choices"][0]["finish_reason"] in ("length", "stop")
                    with self.lock:
                        self.ok += 1
                        self.latencies.append(dt)
                elif r.status == 503 and json.loads(data)["error"]["code"] in DOCUMENTED_503:
                    with self.lock:
                        self.documented_503 += 1
                else:
                    with self.lock:
                        self.failures.append(f"{r.status}: {data[:200]!r}")
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:   # any other outcome is a failure of the server
                with self.lock:
                    self.failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def join(self):
        for t in self.threads:
            t.join(900)


class Slowloris:
    """`n` connections that send a request head one byte every `every` seconds, reopened as
    the server closes them."""

    HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nX-Padding: " + b"a" * 4000

    def __init__(self, server: Server, n: int, every: float = 2.0):
        self.server, self.n, self.every = server, n, every
        self.sel = selectors.DefaultSelector()
        self.socks: dict[socket.socket, list] = {}   # sock -> [next send time, bytes sent]
        self.opened = self.closed_by_server = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex((self.server.host, self.server.port))
        except OSError:
            s.close()
            return
        self.sel.register(s, selectors.EVENT_READ)
        self.socks[s] = [time.monotonic() + 0.05, 0]
        self.opened += 1

    def _drop(self, s):
        self.sel.unregister(s)
        self.socks.pop(s, None)
        s.close()

    def _run(self):
        while not self.stop.is_set():
            for _ in range(min(50, self.n - len(self.socks))):   # ramp up, then keep the size
                self._open()
            for key, _ in self.sel.select(timeout=0.05):
                s = key.fileobj
                try:
                    data = s.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.1 503"):
                    self.closed_by_server += 1
                    self._drop(s)
            now = time.monotonic()
            for s, state in list(self.socks.items()):
                if now >= state[0]:
                    i = state[1] % len(self.HEAD)
                    try:
                        s.send(self.HEAD[i:i + 1])
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        self.closed_by_server += 1
                        self._drop(s)
                        continue
                    state[0], state[1] = now + self.every, state[1] + 1
        for s in list(self.socks):
            self._drop(s)


def flipper(path: Path, squeeze: int, flip: float, calm: float, calm_every: float,
            stop: threading.Event, counts: dict):
    """Rewrite the budget file every `flip` s: unlimited / squeezed, then unlimited for `calm`
    seconds every `calm_every` seconds."""
    squeezed, cycle_start = False, time.monotonic()
    while not stop.wait(flip):
        now = time.monotonic()
        if now - cycle_start >= calm_every:
            text, cycle_start = "none", now
            _write(path, text)
            counts["flips"] += 1
            stop.wait(calm)
            continue
        squeezed = not squeezed
        _write(path, str(squeeze) if squeezed else "none")
        counts["flips"] += 1


def _write(path: Path, text: str):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--seconds", type=float, default=300)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--slow", type=int, default=1000)
    ap.add_argument("--flip", type=float, default=0.2, help="seconds between budget rewrites")
    ap.add_argument("--calm", type=float, default=3.0)
    ap.add_argument("--calm-every", type=float, default=30.0)
    ap.add_argument("--upgrade-after", type=float, default=1.0)
    ap.add_argument("--poll", type=float, default=0.1)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-connections", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    args = ap.parse_args()

    ranked = needs(args.bundle, args.context)
    if len(ranked) < 2:
        sys.exit("the bundle needs two variants for the budget to flip between")
    squeeze = ranked[1][1]      # the second-best fits, the best does not
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"lsaq-soak-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    budget = work / "budget"
    _write(budget, "none")
    server = Server(args, budget)
    model = json.loads(server.get("/v1/models"))["data"][0]["id"]
    log_start = len(server.lines)
    print(f"server pid {server.proc.pid} on {server.host}:{server.port}; {args.clients} clients, "
          f"{args.slow} slow connections, budget flipping every {args.flip:g}s between none and "
          f"{squeeze} B ({ranked[1][0]}'s need) for {args.seconds:g}s", file=sys.stderr)

    stop = threading.Event()
    counts = {"flips": 0}
    clients = Clients(server, args.clients, model, args.max_tokens)
    slow = Slowloris(server, args.slow)
    flip = threading.Thread(target=flipper, args=(budget, squeeze, args.flip, args.calm,
                                                  args.calm_every, stop, counts), daemon=True)
    t0 = time.monotonic()
    slow.thread.start()
    clients.start()
    flip.start()
    peak_slow = 0
    while time.monotonic() - t0 < args.seconds:
        server.sample()
        peak_slow = max(peak_slow, len(slow.socks))
        if server.proc.poll() is not None:
            break
        time.sleep(0.25)
    run = time.monotonic() - t0
    clients.stop.set()      # no new requests; the queued ones are answered (the drain)
    clients.join()
    wall = time.monotonic() - t0
    stop.set()
    slow.stop.set()
    slow.thread.join(30)
    metrics = server.get("/metrics") if server.proc.poll() is None else ""
    peak_rss = server.hwm()
    server.proc.send_signal(signal.SIGTERM)
    try:
        rc = server.proc.wait(120)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        rc = "killed"
    time.sleep(0.5)
    log = server.lines[log_start:]
    tracebacks = sum("Traceback" in line for line in log)

    done = clients.ok + clients.documented_503 + len(clients.failures)
    lat = clients.latencies
    sw = {k: int(metric(metrics, f'lsaq_switches_total{{direction="{k}"}}'))
          for k in ("down", "up", "pause", "resume")}
    closed = {k: int(metric(metrics, f'lsaq_http_connections_closed_total{{reason="{k}"}}'))
              for k in ("evicted", "refused", "header_timeout")}
    head = ("| wall s (run + drain) | clients | slow connections (peak open) | requests | answered | "
            "failed beyond documented 503s | documented 503s | requests/s | p50 s | p95 s | "
            "p99 s | peak RSS MiB | peak open fds |")
    row = (f"| {wall:.0f} | {args.clients} | {args.slow} ({peak_slow}) | {done} | {clients.ok} | "
           f"{len(clients.failures)} | {clients.documented_503} | {clients.ok / wall:.2f} | "
           f"{pct(lat, 50):.2f} | {pct(lat, 95):.2f} | {pct(lat, 99):.2f} | "
           f"{peak_rss / 2**20:.0f} | {server.peak_fds} |")
    sep = "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"
    table = "\n".join([head, sep, row])
    extra = (f"run {run:.0f}s, then {wall - run:.0f}s answering the requests still queued; "
             f"latency is from send to the last byte, queueing included (one generation at a "
             f"time); budget rewrites {counts['flips']}; switches down {sw['down']}, up {sw['up']}, "
             f"pause {sw['pause']}, resume {sw['resume']}; slow connections opened "
             f"{slow.opened}, closed by the server {slow.closed_by_server} (server counts: "
             f"evicted {closed['evicted']}, refused {closed['refused']}, header timeout "
             f"{closed['header_timeout']}); server log {len(log)} lines, {tracebacks} "
             f"tracebacks; SIGTERM exit code {rc}, last log line: "
             f"{log[-1] if log else '-'}")
    print(table)
    print()
    print(extra)
    if clients.failures:
        print("\nfailures (first 10):\n" + "\n".join(clients.failures[:10]))
    if args.out:
        cmd = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
        Path(args.out).write_text(
            f"# Soak: `lsaq-run serve` under attack and under load\n\n"
            f"Command: `{cmd}`\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, {platform.system()} {platform.release()}"
            f"{'; ' + os.environ['SOAK_NOTE'] if os.environ.get('SOAK_NOTE') else ''}\n\n"
            f"{table}\n\n{extra}\n\n"
            f"Server command: `{' '.join(server.cmd[1:])}`\n")
    sys.exit(1 if clients.failures or tracebacks else 0)


if __name__ == "__main__":
    main()
