"""`load()` a bundle onto the best device and variant, and the `Model` that generates with it."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import BundleChanged, LsaqRuntimeError, printable
from .graph_check import check_graph
from .integrity import bundle_path, verify_files
from .manifest import (MANIFEST, check_files, load_manifest, manifest_digest, tokenizer_file,
                       variant_files)
from .planner import Decision, plan_or_wait
from .probe import (Device, check_threads, choose_device, cuda_provider_available,
                    physical_cores, probe_gpus, probe_host)
from .sampling import Sampler
from .session import Runner, create_session, warn
from .sizes import parse_size
from .text import StreamDecoder, TextCodec

BUDGET_ENV = "LSAQ_MEMORY_BUDGET"
TRACE_ENV = "LSAQ_MEMORY_TRACE"  # set to 1: log RSS after each loading stage (bench_memory.py)


def memory_trace(stage: str) -> None:
    """One stderr line with the current and peak RSS of this process, when LSAQ_MEMORY_TRACE=1."""
    if not os.environ.get(TRACE_ENV):
        return
    import resource

    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/status") as f:   # anonymous vs file-backed (memory-mapped) pages
            kinds = {k: int(v.split()[0]) * 1024 for k, v in
                     (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile", "VmHWM")}
    except (OSError, ValueError):
        rss, kinds = -1, {}
    # VmHWM: the peak of this program's own memory. ru_maxrss would also count the parent's
    # pages at exec time (a child started from a big process inherits that high-water mark).
    peak = kinds.pop("VmHWM", None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    extra = "".join(f" {k.lower()}={v}" for k, v in kinds.items())
    print(f"lsaq-memory: {stage} rss={rss} peak={peak}{extra}", file=sys.stderr, flush=True)


class Model:
    """A loaded variant. `variant`, `provider` and `decision` (table + reason) say what and why."""

    def __init__(self, bundle: Path, manifest: dict, decision: Decision, runner: Runner,
                 codec: TextCodec):
        self.bundle, self.manifest, self.decision = bundle, manifest, decision
        self.variant: str = decision.chosen
        self.provider: str = decision.provider          # "cpu" or "cuda"
        self.device: Device = decision.device
        self.context: int = decision.context            # KV cache capacity in tokens
        self.codec = codec
        self._runner = runner
        self.last_stop: str | None = None                # eos | max_new_tokens | context
        self.threads: int | None = None                  # CPU threads ONNX Runtime was given
        self.load_seconds: dict[str, float] = {}         # where launch time went, by step

    @property
    def reason(self) -> str:
        return self.decision.reason

    # -- text ------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        text = self.codec.apply_chat_template(prompt) if chat else prompt
        if not isinstance(text, str):
            raise LsaqRuntimeError("a prompt must be a string (a list of messages needs chat=True)")
        ids = self.codec.encode(text)
        if not ids:
            raise LsaqRuntimeError("the prompt is empty")
        return ids

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               chat: bool = False) -> Iterator[str]:
        """Text pieces of the continuation as they are generated."""
        sampler = Sampler(temperature, top_k, top_p, seed)
        dec = StreamDecoder(self.codec)
        for tok in self.generate_ids(self.encode(prompt, chat), max_new_tokens, sampler):
            piece = dec.push(tok)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 chat: bool = False) -> str:
        return "".join(self.stream(prompt, max_new_tokens, temperature, top_k, top_p, seed, chat))

    # -- tokens ----------------------------------------------------------------------------
    def generate_ids(self, ids: list[int], max_new_tokens: int = 128,
                     sampler: Sampler | Callable[[np.ndarray], int] | None = None) -> Iterator[int]:
        """New token ids: one prefill call for the prompt, then one call per token.

        Stops at an EOS id (not yielded), after max_new_tokens, or when the context is full;
        `last_stop` says which."""
        sampler = sampler or Sampler()
        ids = list(ids)
        if len(ids) >= self.context:
            raise LsaqRuntimeError(f"the prompt is {len(ids)} tokens but the context is "
                                   f"{self.context}; load with a larger --context")
        self.last_stop = "max_new_tokens"
        # Graphs whose RoPE changes past a length (Phi-3 longrope) ask for the cache built
        # within it to be rebuilt before the first token past it (BUNDLE_FORMAT.md).
        switch = self.manifest["model"].get("rope_switch_length")
        logits = self._runner.run(ids, 0, 1)[-1]
        memory_trace("prefill")
        pos = len(ids)
        for i in range(max_new_tokens):
            tok = sampler(logits)
            if tok in self.codec.eos_ids:
                self.last_stop = "eos"
                return
            yield tok
            if i + 1 == max_new_tokens:
                return
            if pos + 1 > self.context:  # no room to feed this token back
                self.last_stop = "context"
                return
            ids.append(tok)
            if pos == switch:
                logits = self._runner.run(ids, 0, 1)[-1]
            else:
                logits = self._runner.run([tok], pos, 1)[-1]
            pos += 1

    def forward(self, ids: list[int], past_len: int = 0, keep: int = 1) -> np.ndarray:
        """Low level: append `ids` after `past_len` cached tokens; logits [keep, vocab] (a copy)."""
        return self._runner.run(ids, past_len, keep).copy()

    def score_tokens(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) for every position, from one prefill with an empty
        cache: row t predicts token t+1. For evaluation (perplexity, likelihoods)."""
        ids = list(ids)
        if not ids:
            raise LsaqRuntimeError("score_tokens needs at least one token")
        return self.forward(ids, 0, len(ids))

    def score_batch(self, rows: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        """For evaluation: several sequences in one run, each from an empty cache. Returns, per
        row, the logits of positions starts[b] .. len(rows[b]) - 1 (row t predicts token t+1)."""
        rows = [list(r) for r in rows]
        if len(starts) != len(rows) or any(not 0 <= s < len(r) for r, s in zip(rows, starts)):
            raise LsaqRuntimeError("score_batch: each start must index a position of its row")
        width = max(map(len, rows))
        # Rows are right-padded: position t of every row is padded index t, and the graph keeps
        # the last width - base positions, so `base` is the first position any row needs.
        base = min(starts)
        out = self._runner.run_batch(rows, width - base)
        return [out[b, s - base: len(r) - base] for b, (r, s) in enumerate(zip(rows, starts))]

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"<lsaq Model {self.manifest['model']['name']} variant={self.variant} "
                f"provider={self.provider} context={self.context}>")


def resolve_budget(memory_budget) -> int | None:
    if memory_budget is None:
        memory_budget = os.environ.get(BUDGET_ENV) or None
        if memory_budget is None:
            return None
    return parse_size(memory_budget)


def _reprobe(device: Device) -> Callable[[], Device]:
    """A probe of the same device, for waiting until memory frees up."""
    if device.kind == "cpu":
        return probe_host

    def again() -> Device:
        for g in probe_gpus():
            if g.index == device.index:
                return g
        return device
    return again


def decide(bundle, context: int | None = None, memory_budget=None, device: str = "auto",
           variant: str | None = None, wait: float = 0, simulate: bool = False,
           log: Callable[[str], None] | None = None, manifest: dict | None = None) -> Decision:
    """The plan `load` would follow, without loading anything (what --dry-run prints)."""
    manifest = manifest or load_manifest(bundle)
    budget = resolve_budget(memory_budget)
    dev, notes = choose_device(device, cuda_available=cuda_provider_available())
    if dev.kind == "cuda" and not any("cuda" in v["providers"] for v in manifest["variants"]):
        if device != "auto":
            raise LsaqRuntimeError(f"--device {device}: this bundle has no cuda graphs "
                                   "(built with build.providers = [\"cpu\"]); use --device cpu")
        notes.append("this bundle has no cuda graphs; using the host")
        dev = probe_host()
    d = plan_or_wait(manifest, _reprobe(dev), wait, log=log, context=context, variant=variant,
                     budget=budget, simulate=simulate)
    d.notes[:0] = notes
    return d


def load(bundle, context: int | None = None, memory_budget=None, device: str = "auto",
         variant: str | None = None, wait: float = 0, threads: int | None = None,
         log: Callable[[str], None] | None = None, pinned: tuple[dict, str] | None = None
         ) -> Model:
    """Load the most precise variant of `bundle` that fits the chosen device.

    context: KV cache capacity in tokens (default: deployment.context_length, capped by
             model.max_context).
    memory_budget: '6GiB', bytes, or None (then $LSAQ_MEMORY_BUDGET); caps the free memory.
    device: auto | cpu | cuda | cuda:N.  variant: force one by name.  wait: seconds to wait for
    memory to free up when nothing fits.  log: where progress lines go (default: nowhere).
    pinned: (manifest, sha256 of its bytes) from manifest.load_pinned: load from that manifest,
    and refuse (BundleChanged) when the folder's manifest is no longer those bytes (a server
    never loads another bundle's files under its launch bundle's name)."""
    root = Path(bundle)
    check_threads(threads)
    threads = threads or physical_cores()
    times: dict[str, float] = {}
    t = time.perf_counter()
    if pinned is not None:
        manifest = _still_pinned(root, *pinned)
    else:
        manifest = load_manifest(root)                  # schema, version, every file's size
    verify_files(root, manifest, [tokenizer_file(manifest)])
    codec = TextCodec(root, manifest)                   # fail on a bad tokenizer before loading
    memory_trace("start")
    d = decide(root, context, memory_budget, device, variant, wait, log=log, manifest=manifest)
    for n in d.notes:
        if log:
            log(f"note: {n}")
    times["plan"] = time.perf_counter() - t
    session, info = _open_variant(root, manifest, d, threads, log, times)
    if d.provider == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime-gpu falls back to CPU silently when CUDA/cuDNN libraries are missing.
        warn(f"ONNX Runtime could not use CUDA on {d.device.label} (CUDA or cuDNN libraries "
             "missing or mismatched?); re-planning for host memory with the CPU graph")
        del session
        d = decide(root, context, memory_budget, "cpu", variant, wait, log=log, manifest=manifest)
        d.notes.append("CUDA was requested but ONNX Runtime fell back to CPU")
        session, info = _open_variant(root, manifest, d, threads, log, times)
    memory_trace("session")
    t = time.perf_counter()
    row = d.chosen_row
    runner = Runner(session, manifest, info["dtype"], d.context, d.provider, d.device.index,
                    planned_kv_bytes=row.kv_bytes if row else None)
    times["kv"] = time.perf_counter() - t
    memory_trace("kv")
    model = Model(root, manifest, d, runner, codec)
    model.threads, model.load_seconds = threads, times
    return model


def _still_pinned(root: Path, manifest: dict, sha: str) -> dict:
    if manifest_digest(root) != sha:
        raise BundleChanged(f"{root / MANIFEST}: the bundle changed on disk after launch (its "
                            "manifest is no longer the one loaded then); restart to use the new "
                            "bundle")
    check_files(root, manifest)
    return manifest


def _open_variant(root: Path, manifest: dict, d: Decision, threads: int | None, log,
                  times: dict[str, float]):
    """Verify every file the chosen variant uses, check its graph against the manifest, then
    hand ONNX Runtime the very bytes that were checked (seconds of each step into `times`)."""
    t = time.perf_counter()
    v = next(x for x in manifest["variants"] if x["name"] == d.chosen)
    info = v["providers"][d.provider]
    files = variant_files(manifest, d.chosen, d.provider)
    graph = bundle_path(root, info["graph"], MANIFEST)
    try:
        data = graph.read_bytes()
    except OSError as e:
        raise LsaqRuntimeError(f"{graph}: cannot be read ({e.strerror})") from None
    entry = next(f for f in manifest["files"] if f["path"] == info["graph"])
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise LsaqRuntimeError(f"{graph}: sha256 mismatch (the file was modified or damaged); "
                               "rebuild or copy the bundle again")
    # Cheap first: the graph and the weight files' headers and sizes (which bound what may be
    # hashed), then the hashes, then the graph again over the headers of the hashed files.
    check_graph(root, manifest, v, d.provider, data)
    verify_files(root, manifest, files[1:], log=log)
    check_graph(root, manifest, v, d.provider, data)
    times["verify"] = time.perf_counter() - t
    t = time.perf_counter()
    session = create_session(graph, d.provider, d.device.index, threads, data=data)
    times["session"] = time.perf_counter() - t
    return session, info


def stderr_log(msg: str) -> None:
    from .rustguard import STDERR_LOCK

    with STDERR_LOCK:  # never inside a tokenizer call's window (rustguard)
        print(f"lsaq-run: {printable(msg, newlines=False)}", file=sys.stderr, flush=True)
