"""Serving that adapts while it runs: one loaded variant, re-planned as free memory changes.

The `Engine` is the part of `lsaq-run serve` that knows nothing about HTTP (server.py is the
web layer). Three pieces:

- a watcher thread re-probes free memory every `poll` seconds with the launch's probe and runs
  the launch's planner (`planner.plan`) on it, and sets the variant the engine should hold:
  down at once when the loaded one no longer fits, up only after a better one has fitted at
  every probe for `upgrade_after` seconds (hysteresis: no flapping at an edge), none when
  nothing fits (the paper's pause);
- a worker thread that runs one generation at a time from a FIFO queue and applies a pending
  switch only between two generations, never during one;
- jobs: a request's token ids and sampling settings; the worker sends its events (start, text,
  done, error) to the job's `sink` and stops generating as soon as the job is cancelled (the
  client went away).

The loaded variant's own memory is not free memory the probe can see, so the plan counts it
back: free to plan with = free seen + the loaded variant's predicted bytes (its weights, KV
cache, workspace and overhead from the manifest), capped by the memory budget. Without that a
loaded variant would push itself out.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import BundleChanged, LsaqRuntimeError, NoVariantFits, first_line
from .integrity import verify_files
from .manifest import MANIFEST, load_pinned, manifest_digest, tokenizer_file
from .planner import Decision, Row, no_fit_message, plan, ranking, resolve_context
from .probe import Device
from .sampling import Sampler
from .sizes import format_size, parse_size
from .text import StreamDecoder, TextCodec

# A variant that failed to load is not planned for again for this long (a damaged file or a
# session that runs out of memory would otherwise be retried at every probe).
FAILED_BACKOFF_S = 30.0


class QueueFull(LsaqRuntimeError):
    """The queue already holds its maximum of waiting requests."""


class ServerClosing(LsaqRuntimeError):
    """The engine is shutting down and takes no more requests."""


def _bytes(n: int | None) -> str:
    return "-" if n is None else f"{format_size(n)} ({n} B)"


class FileBudget:
    """A memory budget read from a file at every probe: '300MB', '6GiB', a byte count, or
    'none' (no cap). An orchestrator (or a test) rewrites the file to squeeze or free the
    server, best atomically (write another file, rename it over this one). A file that cannot
    be read, or is empty (caught mid-rewrite), keeps the last good value (said once)."""

    def __init__(self, path, log: Callable[[str], None] | None = None):
        self.path, self.log, self._said = Path(path), log, None
        self.value = self._read()   # at launch a bad file is an error

    MAX_BYTES = 4096   # a size is a few characters; more is not a budget file

    def _read(self) -> int | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(self.MAX_BYTES + 1)
        except OSError as e:
            raise LsaqRuntimeError(f"{self.path}: cannot read the memory budget file "
                                   f"({e.strerror}); write a size such as 6GiB into it") from None
        try:
            if len(raw) > self.MAX_BYTES or b"\0" in raw:
                raise ValueError
            text = raw.decode("utf-8").strip()
        except ValueError:  # UnicodeDecodeError is one
            raise LsaqRuntimeError(f"{self.path}: the memory budget file is not a short text "
                                   "file; write a size such as 6GiB, or none") from None
        if not text:
            raise LsaqRuntimeError(f"{self.path}: the memory budget file is empty; write a "
                                   "size such as 6GiB, or none")
        if text.lower() == "none":
            return None
        try:
            return parse_size(text)
        except LsaqRuntimeError as e:
            raise LsaqRuntimeError(f"{self.path}: {e}") from None

    def __call__(self) -> int | None:
        try:
            self.value, self._said = self._read(), None
        except LsaqRuntimeError as e:
            if self.log and str(e) != self._said:
                self.log(f"{e}; keeping the budget {_bytes(self.value)}")
            self._said = str(e)
        return self.value


_ids = itertools.count(1)


@dataclass
class Job:
    """One request: what to generate, and where its events go.

    sink(event) receives ("start", {"variant": name}), ("text", str), then ("done", info) or
    ("error", {"status": int, "code": str, "message": str}) (a cancelled job ends with an
    error of status 499, so whoever waits on it always returns); it is called from the worker
    thread, so it must hand the event over (e.g. loop.call_soon_threadsafe) and return."""
    ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    sink: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))
    enqueued: float = 0.0
    started: float | None = None
    generated: int = 0            # tokens generated so far (read by tests and metrics)
    variant: str | None = None
    outcome: str | None = None    # ok | cancelled | timeout | error
    cancelled: threading.Event = field(default_factory=threading.Event)
    abort: dict | None = None     # the error to end with when cancelled by the server itself

    def cancel(self, error: dict | None = None) -> None:
        """Stop the job: the client went away, or (error given) the server ends it with that
        error event (shutdown)."""
        if error is not None and self.abort is None:
            self.abort = error
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.outcome is not None


class StopText:
    """Stop strings over streamed text: emits only text that cannot be the start of a stop
    string, and reports when one is complete (its text and what follows are never sent)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def push(self, piece: str) -> tuple[str, bool]:
        self.buf += piece
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = 0  # longest tail of buf that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:k]):
                    keep = k
                    break
        out = self.buf[:len(self.buf) - keep]
        self.buf = self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass
class _Target:
    variant: str | None          # None: pause (nothing loaded)
    reason: str
    decision: Decision | None
    device: Device | None
    held: int


class Engine:
    """Holds the best variant that fits, re-planned while it runs; serves jobs one at a time.

    bundle, context, device, threads: as for lsaq_runtime.load().
    budget: bytes (a fixed --memory-budget), None, or a callable returning the budget at each
            probe (FileBudget reads it from a file).
    probe: callable returning the Device to plan for (default: the launch's device, probed
           again the same way lsaq-run probes it).
    wait: seconds a queued request waits while nothing fits before it fails (503).
    max_queue: requests that may wait (the running one not counted); more are refused (503).
    poll: seconds between probes.  upgrade_after: seconds a better variant must keep fitting
    before the engine switches up.  on_token(job): called after every generated token (tests
    slow generation down with it)."""

    def __init__(self, bundle, *, context: int | None = None, device: str = "auto",
                 budget: int | Callable[[], int | None] | None = None,
                 probe: Callable[[], Device] | None = None, wait: float = 60.0,
                 max_queue: int = 32, poll: float = 2.0, upgrade_after: float = 30.0,
                 threads: int | None = None, log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_token: Callable[[Job], None] | None = None):
        self.bundle = Path(bundle)
        # The bundle's identity for the server's life: every later load must find these
        # manifest bytes (model.load(pinned=...)), or the server serves no other model under
        # this one's name (see bundle_changed).
        self.manifest, self.manifest_sha = load_pinned(self.bundle)
        self.bundle_changed: str | None = None   # why, once the folder holds another bundle
        self._manifest_stat: tuple | None = self._stat_manifest()
        verify_files(self.bundle, self.manifest, [tokenizer_file(self.manifest)])
        self.codec = TextCodec(self.bundle, self.manifest)   # one tokenizer for every variant
        self.context = resolve_context(self.manifest, context)
        self.device_arg, self.threads = device, threads
        # A fixed budget below the smallest need is hopeless; a budget that is read again
        # (a file) may grow, so then the server starts paused instead.
        self.budget_fixed = not callable(budget)
        self.budget = budget if callable(budget) else (lambda: budget)
        self._probe = probe
        self.wait, self.max_queue = float(wait), int(max_queue)
        self.poll, self.upgrade_after = float(poll), float(upgrade_after)
        self.log = log or (lambda msg: None)
        self.clock, self.on_token = clock, on_token

        self.cond = threading.Condition()
        self.jobs: deque[Job] = deque()
        self.running: Job | None = None
        self.model = None                 # the loaded lsaq_runtime.Model, or None (paused)
        self.current: str | None = None   # its variant
        self.current_row: Row | None = None
        self.held_bytes = 0               # its predicted bytes (counted back as free)
        self.target: _Target | None = None
        self.switching = False
        self.paused_since: float | None = None
        self.pause_reason = "starting"
        self.better_since: float | None = None
        self.failed: dict[str, float] = {}
        self.last: Decision | None = None         # the latest plan
        self.last_device: Device | None = None    # the latest probe, as seen
        self.last_budget: int | None = None
        self.counters = {"switches": {"down": 0, "up": 0, "pause": 0, "resume": 0},
                         "requests": {"ok": 0, "cancelled": 0, "timeout": 0, "rejected": 0,
                                      "error": 0},
                         "prompt_tokens": 0, "completion_tokens": 0, "generation_seconds": 0.0,
                         "probes": 0}
        self.last_tps: float | None = None
        self._closing = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- launch --------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Plan and load the first variant (in this thread: a broken bundle fails the launch),
        then start the watcher and the worker. Starts paused when nothing fits now but could
        later; raises NoVariantFits when waiting cannot help."""
        if self._probe is None:
            self._probe = self._launch_probe()
        self.observe()
        d = self.last
        if self.target.variant is None:
            hopeless = d.smallest_need is None or (
                self.budget_fixed and d.budget_bytes is not None
                and d.budget_bytes < d.smallest_need)
            if hopeless:  # the same test as plan_or_wait's: waiting cannot help
                raise NoVariantFits(no_fit_message(d), d)
            self.paused_since = self.clock()
            self.pause_reason = self.target.reason
            self.log(f"starting paused: {self.target.reason}; requests wait up to "
                     f"{self.wait:.0f}s for memory")
        else:
            self._apply(first=True)
            if self.model is None:  # the plan's variants all failed to load
                raise LsaqRuntimeError(self.pause_reason)
        for name, fn in (("lsaq-watcher", self._watch), ("lsaq-worker", self._work)):
            t = threading.Thread(target=fn, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _launch_probe(self) -> Callable[[], Device]:
        """The device lsaq-run would plan for (model.decide: --device, CUDA graphs present or
        not), probed again the same way at every poll."""
        from .model import _reprobe, decide

        try:
            d = decide(self.bundle, self.context, self.budget(), self.device_arg, wait=0,
                       manifest=self.manifest)
        except NoVariantFits as e:
            d = e.decision
        for n in d.notes:
            self.log(f"note: {n}")
        return _reprobe(d.device)

    # -- the watcher -----------------------------------------------------------------------------
    def observe(self) -> None:
        """One probe and plan; sets the variant the worker should hold (see the module doc)."""
        if self.switching:  # memory is in flux while a variant loads; the next probe decides
            return
        self._check_bundle()
        dev = self._probe()
        budget = self.budget()
        now = self.clock()
        with self.cond:
            held = self.held_bytes if self.model is not None else 0
            current, current_row = self.current, self.current_row
        seen = replace(dev, free_bytes=dev.free_bytes + held)
        d = plan(self.manifest, seen, context=self.context, budget=budget)
        with self.cond:
            self.failed = {k: t for k, t in self.failed.items() if now - t < FAILED_BACKOFF_S}
            failed = set(self.failed)
        fitting = [r for r in d.rows if r.fits and r.name not in failed]
        best = fitting[0] if fitting else None
        rank = {r.name: i for i, r in enumerate(d.rows)}
        where = self._free_story(d, dev, held, current)
        with self.cond:
            self.counters["probes"] += 1
            self.last, self.last_device, self.last_budget = d, dev, budget
            cur = next((r for r in d.rows if r.name == current), None)
            if best is None:
                if d.chosen is None:
                    reason = no_fit_message(d)
                else:
                    reason = ("every variant that fits failed to load in the last "
                              f"{FAILED_BACKOFF_S:.0f}s (see above)")
                want = None
                self.better_since = None
            elif current is None:
                want, reason = best.name, self._fit_reason(d, best, where)
            elif cur is None or not cur.fits:
                need = (current_row or cur).need_bytes
                want = best.name
                reason = (f"memory shrank: {current} needs {_bytes(need)} but "
                          f"{_bytes(d.free_bytes)} is free to plan with ({where})")
                self.better_since = None
            elif rank[best.name] < rank[current]:
                if self.better_since is None:
                    self.better_since = now
                held_for = now - self.better_since
                if held_for >= self.upgrade_after:
                    want = best.name
                    reason = (f"memory freed and stayed free for {held_for:.1f}s (at least "
                              f"{self.upgrade_after:g}s): {_bytes(d.free_bytes)} is free to "
                              f"plan with ({where})")
                else:
                    want, reason = current, ""
            else:
                want, reason = current, ""
                self.better_since = None
            if self.bundle_changed and want is not None and want != current:
                # no other variant may load: keep the one held while it fits, else pause
                keep = current is not None and cur is not None and cur.fits
                want, reason = (current, "") if keep else (None, self._changed_reason())
            if self.target is None or want != self.target.variant:
                self.target = _Target(want, reason, d, dev, held)
                self.cond.notify_all()
            elif want is None:  # still paused: keep the newest numbers for the message
                self.target.reason, self.pause_reason = reason, reason

    @staticmethod
    def _what(d: Decision) -> str:
        return ("the best measured quality that fits" if ranking(d.manifest) in ("kl_fp16", "measured_quality")
                else "the most precise variant that fits")

    def _fit_reason(self, d: Decision, row: Row, where: str) -> str:
        return (f"{row.name} is {self._what(d)} (needs {_bytes(row.need_bytes)} of "
                f"{_bytes(d.free_bytes)} free: {where})")

    @staticmethod
    def _free_story(d: Decision, dev: Device, held: int, current: str | None) -> str:
        s = f"{dev.label}: {_bytes(dev.free_bytes)} free"
        if held:
            s += f" + {_bytes(held)} held by {current}"
        if d.budget_bytes is not None:
            s += f", budget {_bytes(d.budget_bytes)}"
        return s

    def _stat_manifest(self) -> tuple | None:
        try:
            st = (self.bundle / MANIFEST).stat()
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _check_bundle(self) -> None:
        """Note (once) when the folder no longer holds the launch bundle: hashed again only
        when the manifest's identity moved, so a probe costs a stat."""
        if self.bundle_changed:
            return
        st = self._stat_manifest()
        if st == self._manifest_stat:
            return
        try:
            same = st is not None and manifest_digest(self.bundle) == self.manifest_sha
        except LsaqRuntimeError:
            same = False
        if same:
            self._manifest_stat = st
            return
        self._bundle_changed()

    def _bundle_changed(self) -> None:
        with self.cond:
            if self.bundle_changed:
                return
            self.bundle_changed = (f"{self.bundle}: the bundle changed on disk after launch "
                                   f"({MANIFEST} is no longer the one this server loaded)")
        self.log(f"{self.bundle_changed}; serving only what is loaded ("
                 f"{self.current or 'nothing'}) and loading nothing else; restart the server to "
                 "serve the new bundle")

    def _changed_reason(self) -> str:
        return (f"{self.bundle_changed}; no other variant may be loaded under this server's "
                "model id: restart the server to serve the new bundle")

    def _watch(self) -> None:
        said = None
        while not self._stop.wait(self.poll):
            try:
                self.observe()
                said = None
            except Exception as e:  # a failing probe must not stop the server; say it once
                msg = f"re-planning failed: {first_line(e)}; keeping {self.current or 'paused'}"
                if msg != said:
                    self.log(msg)
                said = msg

    # -- switching (worker thread, between generations) --------------------------------------
    def _needs_switch(self) -> bool:
        return self.target is not None and self.target.variant != self.current

    def _apply(self, first: bool = False) -> None:
        from .model import load

        with self.cond:
            t = self.target
            if t is None or t.variant == self.current:
                return
            self.switching = True
            old, old_model = self.current, self.model
            self.model = None
        try:
            rows = [r.name for r in t.decision.rows] if t.decision else []
            if old_model is not None:  # free it first: the new one must fit in what it held
                old_model.close()
                del old_model
                gc.collect()
            if t.variant is None:
                with self.cond:
                    self.current, self.current_row, self.held_bytes = None, None, 0
                    self.paused_since, self.pause_reason = self.clock(), t.reason
                    self.counters["switches"]["pause"] += 1
                self.log(f"pausing (unloaded {old}): {t.reason}; requests wait up to "
                         f"{self.wait:.0f}s in the queue for memory")
                return
            candidates = [t.variant] + [r.name for r in t.decision.rows
                                        if r.fits and r.name != t.variant
                                        and rows.index(r.name) > rows.index(t.variant)
                                        and r.name not in self.failed]
            errors: list[str] = []
            for name in candidates:
                row = next(r for r in t.decision.rows if r.name == name)
                start = time.perf_counter()
                try:
                    if self.bundle_changed:
                        raise BundleChanged(self.bundle_changed)
                    model = load(self.bundle, self.context, t.decision.budget_bytes,
                                 self._device_label(t), variant=name, threads=self.threads,
                                 pinned=(self.manifest, self.manifest_sha))
                except BundleChanged:
                    self._bundle_changed()
                    errors.append(self._changed_reason())
                    break
                except LsaqRuntimeError as e:
                    with self.cond:
                        self.failed[name] = self.clock()
                    errors.append(f"{name}: {e}")
                    self.log(f"loading {name} failed: {e}")
                    continue
                secs = time.perf_counter() - start
                if first:
                    kind = "load"
                elif old is None:
                    kind = "resume"
                else:
                    kind = "down" if rows.index(name) > rows.index(old) else "up"
                with self.cond:
                    self.model, self.current, self.current_row = model, name, row
                    self.held_bytes = row.predicted_bytes
                    self.paused_since, self.better_since = None, None
                    if kind != "load":
                        self.counters["switches"][kind] += 1
                fell = "" if name == t.variant else f" (after {t.variant} failed to load)"
                if kind == "load":
                    self.log(f"loaded {name}{fell} on {model.device.label} ({model.provider} "
                             f"graph, context {model.context}, {model.threads} threads) in "
                             f"{secs:.1f}s — {t.reason}")
                elif kind == "resume":
                    self.log(f"resuming with {name}{fell} (loaded in {secs:.1f}s): {t.reason}")
                else:
                    self.log(f"switch {kind} {old} -> {name}{fell} in {secs:.1f}s, between "
                             f"requests: {t.reason}; {name} needs {_bytes(row.need_bytes)}, "
                             f"{self._what(t.decision)}")
                return
            with self.cond:  # nothing could be loaded: pause until the next plan
                self.current, self.current_row, self.held_bytes = None, None, 0
                why = (self._changed_reason() if self.bundle_changed
                       else "no variant could be loaded: " + "; ".join(errors))
                self.target = _Target(None, why, t.decision, t.device, 0)
                self.paused_since, self.pause_reason = self.clock(), self.target.reason
                self.counters["switches"]["pause"] += 1
            self.log(f"pausing: {self.target.reason}")
        finally:
            with self.cond:
                self.switching = False
                self.cond.notify_all()

    def _device_label(self, t: _Target) -> str:
        # The device the plan was made for; load() must not pick another one ("auto").
        return t.device.label if t.device is not None else self.device_arg

    # -- requests ------------------------------------------------------------------------------
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt (text, or chat messages through the bundle's template), as
        Model.encode makes them."""
        text = self.codec.apply_chat_template(prompt) if chat else prompt
        ids = self.codec.encode(text)
        if not ids:
            raise LsaqRuntimeError("the prompt is empty")
        return ids

    def submit(self, job: Job) -> Job:
        with self.cond:
            if self._closing:
                raise ServerClosing("the server is shutting down")
            if len(self.jobs) >= self.max_queue:
                self.counters["requests"]["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting"
                                + (", paused: no variant fits" if self.model is None else "")
                                + "); retry later")
            job.enqueued = self.clock()
            self.jobs.append(job)
            self.cond.notify_all()
        return job

    def _work(self) -> None:
        while True:
            with self.cond:
                job = None
                while job is None:
                    if self._closing:
                        return
                    while self.jobs and self.jobs[0].cancelled.is_set():
                        self._finish(self.jobs.popleft(), "cancelled")
                    if self._needs_switch():
                        break
                    if self.model is not None and self.jobs:
                        job = self.jobs.popleft()
                        self.running = job
                        break
                    timeout = self.poll
                    if self.model is None and self.jobs:
                        timeout = min(timeout, self._expire())
                    self.cond.wait(timeout=max(timeout, 0.01))
            if job is None:
                self._apply()
                continue
            try:
                self._run(job)
            except BaseException as e:  # never let one request stop the worker (and the queue)
                self.log(f"request {job.id}: unexpected {type(e).__name__}: {first_line(e)}")
                if job.outcome is None:
                    self._finish(job, "error", {"status": 500, "code": "generation_failed",
                                                "message": f"generation failed: {first_line(e)}"})
            finally:
                with self.cond:
                    self.running = None
                    self.cond.notify_all()

    def _expire(self) -> float:
        """Fail queued requests that have waited `wait` seconds for memory while paused;
        seconds until the next one would (under self.cond)."""
        now, nxt = self.clock(), float("inf")
        for job in list(self.jobs):
            waited = now - max(job.enqueued, self.paused_since or job.enqueued)
            if waited >= self.wait:
                self.jobs.remove(job)
                self._finish(job, "timeout", {
                    "status": 503, "code": "no_variant_fits",
                    "message": (f"the server is paused and this request waited {waited:.0f}s "
                                f"(the server's --wait) for memory to free up: "
                                f"{self.pause_reason}")})
            else:
                nxt = min(nxt, self.wait - waited)
        return nxt

    def _finish(self, job: Job, outcome: str, error: dict | None = None) -> None:
        job.outcome = outcome
        with self.cond:  # an RLock: callers may hold it already
            self.counters["requests"][outcome] += 1
        if outcome == "timeout":
            self.log(f"request {job.id}: {error['message']}")
        if outcome == "cancelled":
            if job.started is None:
                self.log(f"request {job.id}: client went away while queued")
            # 499 is nginx's "client closed request": nobody reads it, the handler just ends
            error = {"status": 499, "code": "client_closed", "message": "the client went away"}
        if error is not None:
            self._send(job, ("error", error))

    def _send(self, job: Job, event: tuple) -> None:
        try:
            job.sink(event)
        except Exception:  # the client's side is gone (its event loop closed): nothing to tell
            job.cancel()

    def _run(self, job: Job) -> None:
        model, variant = self.model, self.current
        job.started, job.variant = self.clock(), variant
        self._send(job, ("start", {"variant": variant, "queued_s": job.started - job.enqueued}))
        dec, stops = StreamDecoder(self.codec), StopText(job.stop)
        t0, finish, hit = time.perf_counter(), None, False
        try:
            for tok in model.generate_ids(job.ids, job.max_new_tokens, job.sampler):
                job.generated += 1
                if self.on_token:
                    self.on_token(job)
                if job.cancelled.is_set():
                    break
                piece = dec.push(tok)
                if piece:
                    out, hit = stops.push(piece)
                    if out:
                        self._send(job, ("text", out))
                    if hit:
                        break
            if not hit and not job.cancelled.is_set():
                out, hit = stops.push(dec.flush())
                out += "" if hit else stops.flush()
                if out:
                    self._send(job, ("text", out))
            finish = "stop" if hit or model.last_stop == "eos" else "length"
        except Exception as e:  # ORT failures come as LsaqRuntimeError; anything else is a bug
            secs = time.perf_counter() - t0
            msg = str(e) if isinstance(e, LsaqRuntimeError) else \
                f"unexpected {type(e).__name__}: {first_line(e)}"
            self.log(f"request {job.id}: generation failed after {job.generated} tokens "
                     f"on {variant}: {msg}")
            self._account(job, secs)
            self._finish(job, "error", {"status": 500, "code": "generation_failed",
                                        "message": f"generation failed on {variant}: {msg}"})
            return
        secs = time.perf_counter() - t0
        self._account(job, secs)
        if job.cancelled.is_set() and job.abort is not None:
            self.log(f"request {job.id}: ended by the server after {job.generated} of "
                     f"{job.max_new_tokens} tokens: {job.abort['message']}")
            self._finish(job, "error", job.abort)
            return
        if job.cancelled.is_set():
            self.log(f"request {job.id}: client disconnected; stopped generating after "
                     f"{job.generated} of {job.max_new_tokens} tokens")
            self._finish(job, "cancelled")
            return
        job.outcome = "ok"
        with self.cond:
            self.counters["requests"]["ok"] += 1
        self._send(job, ("done", {"finish_reason": finish, "prompt_tokens": len(job.ids),
                                  "completion_tokens": job.generated, "variant": variant,
                                  "seconds": secs}))

    def _account(self, job: Job, secs: float) -> None:
        with self.cond:
            self.counters["prompt_tokens"] += len(job.ids)
            self.counters["completion_tokens"] += job.generated
            self.counters["generation_seconds"] += secs
            if job.generated and secs > 0:
                self.last_tps = job.generated / secs

    # -- state ---------------------------------------------------------------------------------
    def status(self) -> dict:
        with self.cond:
            d, row = self.last, self.current_row
            state = ("switching" if self.switching else "paused" if self.model is None
                     else "ok")
            return {"status": state, "variant": self.current,
                    "reason": self.pause_reason if self.model is None else None,
                    "queue": len(self.jobs), "queue_limit": self.max_queue,
                    "running": self.running is not None, "context": self.context,
                    "device": self.last_device.label if self.last_device else None,
                    "free_bytes": d.free_bytes if d else None,
                    "device_free_bytes": self.last_device.free_bytes if self.last_device else None,
                    "budget_bytes": self.last_budget,
                    "need_bytes": row.need_bytes if row else None,
                    "switches": dict(self.counters["switches"]),
                    "bundle": {"manifest_sha256": self.manifest_sha,
                               "changed": self.bundle_changed}}

    def metrics(self) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        with self.cond:
            d, dev, row, c = self.last, self.last_device, self.current_row, self.counters
            variants = [r.name for r in d.rows] if d else []
            lines: list[str] = []

            def metric(name, kind, help_, samples):
                lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
                for labels, value in samples:
                    lab = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
                    lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

            metric("lsaq_variant_loaded", "gauge", "1 for the variant serving requests.",
                   [({"variant": v}, int(v == self.current)) for v in variants])
            metric("lsaq_paused", "gauge", "1 while no variant fits and requests wait.",
                   [({}, int(self.model is None and not self.switching))])
            metric("lsaq_switching", "gauge", "1 while a variant is being loaded.",
                   [({}, int(self.switching))])
            metric("lsaq_free_bytes", "gauge", "Free memory the last plan compared needs "
                   "against (the probe's free + the loaded variant's bytes, budget applied).",
                   [({}, d.free_bytes if d else 0)])
            metric("lsaq_device_free_bytes", "gauge", "Free memory the last probe saw.",
                   [({"device": dev.label}, dev.free_bytes)] if dev else [])
            if self.last_budget is not None:
                metric("lsaq_budget_bytes", "gauge", "The memory budget at the last probe.",
                       [({}, self.last_budget)])
            metric("lsaq_variant_need_bytes", "gauge", "Memory need of each variant at this "
                   "context (predicted + safety margin).",
                   [({"variant": r.name}, r.need_bytes) for r in (d.rows if d else [])
                    if r.need_bytes is not None])
            metric("lsaq_switches_total", "counter", "Variant switches by direction.",
                   [({"direction": k}, v) for k, v in c["switches"].items()])
            metric("lsaq_queue_length", "gauge", "Requests waiting (the running one not "
                   "counted).", [({}, len(self.jobs))])
            metric("lsaq_queue_limit", "gauge", "Most requests that may wait.",
                   [({}, self.max_queue)])
            metric("lsaq_running", "gauge", "1 while a generation runs.",
                   [({}, int(self.running is not None))])
            metric("lsaq_requests_total", "counter", "Finished requests by outcome.",
                   [({"outcome": k}, v) for k, v in c["requests"].items()])
            metric("lsaq_prompt_tokens_total", "counter", "Prompt tokens processed.",
                   [({}, c["prompt_tokens"])])
            metric("lsaq_completion_tokens_total", "counter", "Tokens generated.",
                   [({}, c["completion_tokens"])])
            metric("lsaq_generation_seconds_total", "counter", "Seconds spent generating.",
                   [({}, round(c["generation_seconds"], 6))])
            metric("lsaq_tokens_per_second", "gauge", "Generated tokens per second of the "
                   "last finished request (prefill included).",
                   [({}, round(self.last_tps or 0.0, 3))])
            metric("lsaq_probes_total", "counter", "Memory probes and plans.",
                   [({}, c["probes"])])
            return "\n".join(lines) + "\n"

    SHUTDOWN = {"status": 503, "code": "shutting_down",
                "message": "the server is shutting down; retry on another server or later"}

    def begin_shutdown(self) -> None:
        """Take no more requests, fail the waiting ones (503 shutting_down) and end the running
        one with that error at its next token; returns at once (the HTTP layer then finishes
        the responses, and close() waits for the threads)."""
        with self.cond:
            self._closing = True
            waiting = list(self.jobs)
            self.jobs.clear()
            running = self.running
            self.cond.notify_all()
        self._stop.set()
        for job in waiting:
            self._finish(job, "error", dict(self.SHUTDOWN))
        if running is not None:
            running.cancel(dict(self.SHUTDOWN))

    def close(self) -> None:
        """Stop the threads, fail waiting requests (503), unload the variant."""
        self.begin_shutdown()
        for t in self._threads:
            t.join(timeout=30)
        if self.model is not None:
            self.model.close()
            self.model = None


def _label(v) -> str:
    return str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")

