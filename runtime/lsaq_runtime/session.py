"""One ONNX Runtime session on one graph, plus the KV cache it writes into.

The KV cache is one preallocated buffer per layer and tensor, of capacity `context` tokens,
bound through IOBinding as both `past_key_values.{i}.*` and `present.{i}.*`. GroupQueryAttention
sees that past and present share memory and appends in place (checked to give the same logits
as feeding present back as past, on CPU in float32 and float16), so the cache is allocated once,
lives on the device between steps (CUDA) and is never copied or regrown.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import LsaqRuntimeError, first_line, printable
from .manifest import kv_bytes_per_token
from .probe import physical_cores

_NP = {"float32": np.float32, "float16": np.float16}
# The oldest onnxruntime that runs every variant: before 1.23 the CPU MatMulNBits kernel has no
# 8-bit path (1.20-1.21 refuse the graph, 1.22 fails on the first run). pyproject says the same;
# CI tests this floor.
MIN_ONNXRUNTIME = (1, 23)


def check_onnxruntime_version(version: str = ort.__version__) -> None:
    try:
        have = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return  # a development build: let it try
    if have < MIN_ONNXRUNTIME:
        need = ".".join(map(str, MIN_ONNXRUNTIME))
        raise LsaqRuntimeError(f"onnxruntime {version} is too old: LSAQ bundles need {need} or "
                               f"newer (8-bit MatMulNBits); pip install 'onnxruntime>={need}'")


def create_session(graph: Path, provider: str, device_index: int | None = None,
                   threads: int | None = None, data: bytes | None = None) -> ort.InferenceSession:
    """A session on `graph`. With `data` (the graph's bytes, already verified and checked),
    ONNX Runtime parses exactly those bytes, not whatever the file holds by then; external data
    is resolved in the graph's folder."""
    check_onnxruntime_version()
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's own warnings are noise for users; we check what matters
    # Default: one thread per physical core this process may use (not ORT's own count, which
    # ignores affinity masks and container CPU quotas).
    so.intra_op_num_threads = threads or physical_cores()
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": int(device_index or 0)}),
                     "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    source: str | bytes = str(graph)
    if data is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                    str(Path(graph).parent))
        source = data
    try:
        return ort.InferenceSession(source, so, providers=providers)
    except MemoryError:
        raise LsaqRuntimeError(f"{graph}: out of memory while ONNX Runtime loaded it; free "
                               "memory or use a smaller variant (--memory-budget)") from None
    except Exception as e:  # ORT raises its own exception types; keep the first line
        raise LsaqRuntimeError(f"{graph}: ONNX Runtime could not load it: {first_line(e)}") from None


class Runner:
    """Runs the graph with a shared, preallocated KV cache of `capacity` tokens (batch 1)."""

    def __init__(self, session: ort.InferenceSession, manifest: dict, dtype: str, capacity: int,
                 provider: str, device_index: int | None = None, planned_kv_bytes: int | None = None):
        m = manifest["model"]
        self.session = session
        self.layers = m["num_layers"]
        self.capacity = capacity
        self.vocab = m["vocab_size"]
        dev = "cuda" if provider == "cuda" else "cpu"
        self.device = (dev, int(device_index or 0) if dev == "cuda" else 0)
        # KV memory is sized by the same formula the planner counted with (the model's shape,
        # which the manifest's kv_bytes_per_token was checked against), never beyond the plan.
        shape = [1, m["num_key_value_heads"], capacity, m["head_dim"]]
        self._kv_dtype, self._kv_heads, self._head_dim = _NP[dtype], shape[1], shape[3]
        total = kv_bytes_per_token(m, dtype) * capacity
        if planned_kv_bytes is not None and total > planned_kv_bytes:
            raise LsaqRuntimeError(f"the KV cache would take {total} bytes but the plan counted "
                                   f"{planned_kv_bytes}; refusing to allocate more than planned")
        self.kv = []
        self._host: list[np.ndarray] = []
        self._logits: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}
        try:
            for i in range(self.layers):
                for part in ("key", "value"):
                    if dev == "cpu":
                        # Touch the pages now: memory is committed at load time (an out-of-memory
                        # shows up here, not mid-generation, and the RSS matches the prediction).
                        buf = np.empty(shape, _NP[dtype])
                        buf.fill(0)
                        self._host.append(buf)  # the OrtValue borrows this memory
                        val = ort.OrtValue.ortvalue_from_numpy(buf)
                    else:
                        val = ort.OrtValue.ortvalue_from_shape_and_type(shape, _NP[dtype], *self.device)
                    self.kv.append((f"past_key_values.{i}.{part}", f"present.{i}.{part}", val))
        except MemoryError:
            self.kv, self._host = [], []
            raise LsaqRuntimeError(f"out of memory allocating the KV cache ({total:,} bytes for "
                                   f"{capacity} tokens); use a smaller --context") from None
        except Exception as e:  # CUDA allocation failures come as ORT errors
            self.kv, self._host = [], []
            raise LsaqRuntimeError(f"could not allocate the KV cache ({total:,} bytes) on "
                                   f"{dev}: {first_line(e)}; use a smaller --context") from None
        self.binding = session.io_binding()
        for past, present, val in self.kv:
            self.binding.bind_ortvalue_input(past, val)
            self.binding.bind_ortvalue_output(present, val)

    def run(self, ids, past_len: int, keep: int = 1) -> np.ndarray:
        """Append `ids` after `past_len` cached tokens; logits [keep, vocab] of the last positions."""
        n = len(ids)
        total = past_len + n
        if total > self.capacity:
            raise LsaqRuntimeError(f"{total} tokens exceed the context of {self.capacity}; "
                                   "load with a larger context")
        b = self.binding
        b.bind_cpu_input("input_ids", np.asarray(ids, np.int64).reshape(1, n))
        b.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        b.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        b.bind_cpu_input("num_logits_to_keep", np.array(keep, np.int64))
        if not 1 <= keep <= n:
            raise LsaqRuntimeError(f"keep must be between 1 and the {n} new tokens, not {keep}")
        b.bind_ortvalue_output("logits", self._logits_buffer(keep))
        try:
            self.session.run_with_iobinding(b)
        except MemoryError:
            raise LsaqRuntimeError(f"out of memory running {n} tokens; use a shorter prompt or "
                                   "a smaller variant") from None
        except Exception as e:
            raise LsaqRuntimeError(f"ONNX Runtime failed while running the graph: {first_line(e)}; "
                                   "the bundle may be damaged (lsaq-run verify) or the device "
                                   "out of memory") from None
        return self._logits[keep][0][0]

    def run_batch(self, rows: list[list[int]], keep: int) -> np.ndarray:
        """Score several sequences at once, each from an empty cache (evaluation): they are
        right-padded to one length, GroupQueryAttention masks each by its seqlens_k (bitwise
        the same logits as one at a time, tested). Logits [rows, keep, vocab] of the last
        `keep` padded positions. The generation KV cache is not touched."""
        if not rows or min(map(len, rows)) < 1:
            raise LsaqRuntimeError("run_batch needs non-empty sequences")
        width = max(map(len, rows))
        if width > self.capacity:
            raise LsaqRuntimeError(f"{width} tokens exceed the context of {self.capacity}; "
                                   "load with a larger context")
        if not 1 <= keep <= width:
            raise LsaqRuntimeError(f"keep must be between 1 and {width}, not {keep}")
        ids = np.zeros((len(rows), width), np.int64)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = r
        empty = np.zeros((len(rows), self._kv_heads, 0, self._head_dim), self._kv_dtype)
        feed = {"input_ids": ids, "seqlens_k": np.array([len(r) - 1 for r in rows], np.int32),
                "total_sequence_length": np.array(width, np.int32),
                "num_logits_to_keep": np.array(keep, np.int64)}
        for past, _, _ in self.kv:
            feed[past] = empty
        try:
            return self.session.run(["logits"], feed)[0]
        except MemoryError:
            raise LsaqRuntimeError(f"out of memory scoring {len(rows)} sequences of up to "
                                   f"{width} tokens; use a smaller batch") from None
        except Exception as e:
            raise LsaqRuntimeError(f"ONNX Runtime failed while running the graph: "
                                   f"{first_line(e)}") from None

    def _logits_buffer(self, keep: int) -> ort.OrtValue:
        # Host memory we own: ORT writes (or copies from the GPU) the logits straight into it.
        if keep not in self._logits:
            if keep != 1:
                self._logits = {k: v for k, v in self._logits.items() if k == 1}
            arr = np.empty((1, keep, self.vocab), np.float32)
            self._logits[keep] = (arr, ort.OrtValue.ortvalue_from_numpy(arr))
        return self._logits[keep][1]

    def close(self) -> None:
        self.binding = None
        self.kv, self._host, self._logits = [], [], {}
        self.session = None


def warn(msg: str) -> None:
    from .rustguard import STDERR_LOCK

    with STDERR_LOCK:
        print(f"lsaq-run: WARNING: {printable(msg, newlines=False)}", file=sys.stderr, flush=True)
