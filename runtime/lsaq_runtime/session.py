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

from .errors import LsaqRuntimeError

_NP = {"float32": np.float32, "float16": np.float16}


def create_session(graph: Path, provider: str, device_index: int | None = None,
                   threads: int | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's own warnings are noise for users; we check what matters
    if threads:
        so.intra_op_num_threads = threads
    if provider == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": int(device_index or 0)}),
                     "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(graph), so, providers=providers)
    except Exception as e:  # ORT raises its own exception types; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LsaqRuntimeError(f"{graph}: ONNX Runtime could not load it: {first}") from None


class Runner:
    """Runs the graph with a shared, preallocated KV cache of `capacity` tokens (batch 1)."""

    def __init__(self, session: ort.InferenceSession, manifest: dict, dtype: str, capacity: int,
                 provider: str, device_index: int | None = None):
        m = manifest["model"]
        self.session = session
        self.layers = m["num_layers"]
        self.capacity = capacity
        self.vocab = m["vocab_size"]
        dev = "cuda" if provider == "cuda" else "cpu"
        self.device = (dev, int(device_index or 0) if dev == "cuda" else 0)
        shape = [1, m["num_key_value_heads"], capacity, m["head_dim"]]
        self.kv = []
        self._host: list[np.ndarray] = []
        self._logits: dict[int, tuple[np.ndarray, ort.OrtValue]] = {}
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
        b.bind_ortvalue_output("logits", self._logits_buffer(keep))
        self.session.run_with_iobinding(b)
        return self._logits[keep][0][0]

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
    print(f"lsaq-run: WARNING: {msg}", file=sys.stderr, flush=True)
