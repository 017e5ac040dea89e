"""Streamed sensitivity estimate: the KL cost of quantizing each linear in a fixed number of
passes over the model, with one decoder layer in memory at a time.

The exact measurement (`sensitivity.KLMeter`) quantizes each linear alone and runs the later
layers and a full-vocabulary KL for every one: layers^2 x vocabulary work, with the whole model
held in float32. Here the same quantity, mean KL(FP16 || quantized) of the next-token
distributions, is estimated to second order at the FP16 model. Per predicted position,

    KL(p || q) ~= 1/2 dz^T F dz,       F = diag(p) - p p^T = E_{y~p}[r r^T],  r = e_y - p

where dz is the change of the logits. Let g be the gradient of sum_t log p(y_t) (one label
y_t ~ p_t drawn at every position: a "probe") with respect to a linear's output o, and
do = x (Q(W) - W)^T that linear's output change at its FP16 input x. To first order the logits
move by J do, and g . do = sum_t r_t . dz_t, so

    sum_t KL_t ~= 1/2 E_y[(g . do)^2]

(the cross terms between positions vanish in expectation: the y_t are drawn independently).
This is the Fisher quadratic form of the weight change, i.e. (KL gradient x weight change)^2,
computed without holding the model: g for every linear of every layer comes from one backward
sweep per probe that recomputes one layer at a time from its stored input.

Passes over the model (each reads every layer's weights once):
  1. forward: the FP16 hidden state entering every layer is stored (float16, or float32 past
     float16's range; on disk by np.memmap when large), and the top one is projected on the
     vocabulary in row chunks; in a build this pass only reads the states an earlier pass
     kept (PlanStates);
  2. at the head: `probes` label sets y ~ p (Gumbel-max per vocabulary chunk, the noise drawn
     on the CPU so every device draws the same labels) and the gradient they send down;
  3. backward from the top: per layer, the quantized candidates of its linears (exactly the
     weights the graphs compute with), a forward from the stored input, and one
     vector-Jacobian product per probe, which gives g at every linear and the gradient entering
     the layer below. By-products: the local output error |do|^2 of every linear.
Cost: about 4 + probes forward-pass equivalents (forward; the backward's forward with graph;
do at two precisions; one input-gradient VJP per probe, about a forward each; three passes over
the head) and one quantization of every linear, whatever the number of linears. Memory: one
layer (compute dtype) plus one linear's quantized candidates, the calibration hidden states
(float16) and the probes' gradients (float32, probes x tokens x hidden, twice).

`plans_kl` is the whole-plan check in the same style: every plan of a ladder measured exactly
(the KLMeter number) in one streamed pass, one weight read and quantization per layer.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from lsaq_runtime.format import LINEAR_PART, PARTS, STORED_OF, TABLE_BASE, layer_key

from .devices import _clock, _device, _dtype, _tensor, synchronize  # noqa: F401  (estimate._device: the public spelling of old)
from .errors import LsaqError
from .export_onnx import EMBED, FINAL_NORM, LM_HEAD, part_precision, table_scheme, table_weight
from .layerwise import (_classes, final_norm, module_state, position_embeddings,
                        run_layer, torch_linears)
from .model_source import LINEAR_NAMES, ModelSource
from .plan import UNITS
from .quantize import QuantScheme
from .quantize import dequantize_torch as _dequantized
from . import sensitivity
from .sensitivity import GRANULARITY, QUANTIZED, Sensitivity, _stats_key

HEAD_CHUNK = 8192          # vocabulary rows projected at once: bounds the head's memory
MEMMAP_BYTES = 256 << 20   # stored hidden states above this go to a file, not RAM
QUANTIZED_TABLE_CACHE = 1 << 30   # quantized token tables up to this in all (float32) are kept
PASS_BATCH = 4             # windows a pass runs through a layer at once (the same in every pass,
                           # so that one pass's FP16 states are another's, bit for bit)
TABLE_OF = {f"{base}.weight": t for t, base in TABLE_BASE.items()}   # EMBED -> "embed_tokens"


# ---------------------------------------------------------------------------- progress
@dataclass
class Step:
    """One progress report: `done` of `total` layers of `stage` after `elapsed` seconds;
    `eta` is the seconds left in the whole estimate (stages weighted by measured rates)."""
    stage: str
    done: int
    total: int
    elapsed: float
    rate: float      # layers per second in this stage
    eta: float

    def __str__(self) -> str:
        return (f"{self.stage}: layer {self.done}/{self.total}, {self.rate * 60:.1f} layers/min, "
                f"{self.elapsed:.0f}s elapsed, about {_clock(self.eta)} left")


ProgressFn = Callable[[Step], None]


class _Clock:
    """Per-stage layer rates and an ETA: a backward layer costs about (1 + probes) forward
    layers until one has been timed. A tick waits for the device's queued work first."""

    def __init__(self, L: int, probes: int, progress: ProgressFn | None,
                 device: torch.device = torch.device("cpu")):
        self.L, self.progress, self.t0 = L, progress, time.perf_counter()
        self.device = device
        self.per = {"forward": None, "backward": None}
        self.ratio = 1.0 + probes
        self.stages = ("forward", "backward") if probes else ("local",)
        self.skipped = 0       # backward layers a resumed run finds done

    def skip(self, n: int) -> None:
        self.skipped = n

    def skip_forward(self) -> None:
        pass

    def tick(self, stage: str, done: int, since: float) -> None:
        """`done` layers of `stage` finished; the stage started at perf_counter() `since`."""
        synchronize(self.device)
        now = time.perf_counter()
        t_stage = now - since
        new = done - (self.skipped if stage == "backward" else 0)
        per = t_stage / max(new, 1)
        self.per[stage if stage in self.per else "forward"] = per
        fwd = self.per["forward"]
        bwd = self.per["backward"] or (fwd * self.ratio if fwd else per)
        left = (self.L - done) * per
        if stage == "forward" and "backward" in self.stages:
            left += (self.L - self.skipped) * bwd
        if self.progress:
            self.progress(Step(stage, done, self.L, now - self.t0, 1 / per, left))


# ---------------------------------------------------------------------------- the stack
def _as_tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor over `a` without a copy where numpy allows; a read-only array (a
    memory map) is only ever read through it, so torch's warning about it does not apply."""
    return _tensor(np.asarray(a, np.float32))


class _Stack:
    """The model's pieces, built on demand: one decoder layer at a time (compute dtype, on the
    device), the embedding rows of the calibration tokens, the final norm, the head by chunks."""

    def __init__(self, source: ModelSource, windows: np.ndarray, device: torch.device,
                 dtype: torch.dtype, schemes: dict[str, QuantScheme] | None = None,
                 candidates: str | os.PathLike | None = None):
        spec = self.spec = source.spec
        self.source, self.device, self.dtype = source, device, dtype
        self.schemes = schemes or {}
        self.candidates = Path(candidates) if candidates is not None else None
        if self.candidates is not None:
            self.candidates.mkdir(parents=True, exist_ok=True)
        self._quantized: dict[tuple[str, str], np.ndarray] = {}
        self._tables: dict = {}   # (table, precision) -> memory-mapped QuantizedTensor
        self.config = spec.to_hf_config()
        self.config._attn_implementation = "sdpa"
        self.layer_cls, _ = _classes(spec.architecture)
        self.ids = np.asarray(windows, dtype=np.int64)
        if self.ids.ndim != 2 or self.ids.shape[1] < 2:
            raise LsaqError(f"calibration windows must be [samples, seq_len >= 2], not {self.ids.shape}")
        self.n, self.seq_len = self.ids.shape
        self.tokens = self.n * (self.seq_len - 1)   # the last position predicts nothing inside
        self.state_facts = state_facts(device, dtype, self.ids)   # names kept plan states
        self.modules = torch_linears(spec)          # transformers' module -> HF linears it stacks
        positions = torch.arange(self.seq_len)[None]
        rot = position_embeddings(spec, self.config, torch.zeros(1, 1, dtype=torch.float32),
                                  positions)
        self.positions = positions.to(device)
        self.rotary = [{k: tuple(t.to(device, dtype) for t in v) for k, v in r.items()}
                       for r in rot]
        self._masks: dict = {}
        self.norm = self._t(np.asarray(source.tensor(FINAL_NORM), np.float32))
        tied = spec.tie_word_embeddings or not source.has_tensor(LM_HEAD)
        self.head_name = EMBED if tied else LM_HEAD
        self.vocab = self._rows_count(self.head_name)

    def _rows(self, name: str, a: int, b: int, precision: str = "fp16") -> np.ndarray:
        """float32 rows [a, b) of the embedding or head as the FP16 model holds them
        (ModelSource.table_rows), or as a graph at `precision` computes with them (a table is
        quantized per row, so a range of rows is quantized alone). A quantized table is made
        once where the build keeps candidates (_table_quantized); a small one's float32 copy
        is kept (refinement asks again)."""
        if precision != "fp16":
            key = (name, precision)
            if key in self._quantized:
                return self._quantized[key][a:b]
            n = self._rows_count(name)
            qt = self._table_quantized(name, precision)
            size = n * self.spec.hidden_size * 4
            if size <= QUANTIZED_TABLE_CACHE:
                while self._quantized and size + sum(
                        t.nbytes for t in self._quantized.values()) > QUANTIZED_TABLE_CACHE:
                    self._quantized.pop(next(iter(self._quantized)))   # the oldest first
                if qt is not None:
                    table = _dequantized(qt.rows(0, n)).numpy()
                else:
                    table = np.concatenate([table_weight(r, precision, self.schemes)
                                            for r in self._row_chunks(name)])
                self._quantized[key] = table
                return table[a:b]
            if qt is not None:
                return _dequantized(qt.rows(a, b)).numpy()
            return table_weight(self._rows(name, a, b), precision, self.schemes)
        return self.source.table_rows(name, a, b)

    def _table_quantized(self, name: str, precision: str):
        """Table `name` quantized at `precision` as the store holds it (memory-mapped from the
        candidate folder), made on first use by row chunks (each row is quantized alone, so
        the same bytes); None where the build keeps no candidates."""
        if self.candidates is None:
            return None
        from .quantize import (load_table_candidate, quantize, save_table_candidate,
                               table_candidate_path)

        key = (name, precision)
        if key not in self._tables:
            scheme = table_scheme(self.schemes, precision)
            path = table_candidate_path(self.candidates, TABLE_OF[name], scheme)
            if load_table_candidate(path, scheme) is None:   # None too if cut short by a kill
                save_table_candidate(path, [quantize(r, scheme) for r in self._row_chunks(name)])
            self._tables[key] = load_table_candidate(path, scheme)
        return self._tables[key]

    def _row_chunks(self, name: str):
        """The table's FP16-rounded rows, HEAD_CHUNK at a time (a quantized copy is made by
        these: every row is quantized alone)."""
        n = self._rows_count(name)
        for c in range(0, n, HEAD_CHUNK):
            yield self._rows(name, c, min(n, c + HEAD_CHUNK))

    def _rows_count(self, name: str) -> int:
        return self.source.table_rows_count(name)

    def _t(self, a: np.ndarray) -> torch.Tensor:
        # a read-only array (a memory map) is copied: torch tensors may be written through
        return torch.from_numpy(np.require(a, requirements="CW")).to(self.device, self.dtype)

    def mask(self, i: int) -> torch.Tensor:
        w = self.spec.layer_window(i)
        if w not in self._masks:
            q = torch.arange(self.seq_len)[:, None]
            k = torch.arange(self.seq_len)[None, :]
            allowed = (k <= q) & ((q - k) < w if w is not None else True)
            m = torch.zeros(self.seq_len, self.seq_len, dtype=self.dtype)
            m.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            self._masks[w] = m[None, None].to(self.device)
        return self._masks[w]

    def embedded(self, precision: str = "fp16") -> torch.Tensor:
        """float32 [n, T, hidden] on the CPU: the embeddings of the windows, as the FP16 model
        (or a graph with the table at `precision`) computes them."""
        rows_n = self.vocab if self.head_name == EMBED else self._rows_count(EMBED)
        if int(self.ids.max()) >= rows_n:
            raise LsaqError(f"calibration token id {int(self.ids.max())} is outside the model's "
                            f"{rows_n}-row embedding")
        uniq, inv = np.unique(self.ids.reshape(-1), return_inverse=True)
        out = self.source.table_rows_at(EMBED, uniq)   # the ids' rows, a row range at a time
        if precision != "fp16":
            # a table is quantized row by row, so the windows' rows quantized alone are the
            # graph's: a few hundred rows, not the whole table (128k rows at Llama 3)
            out = table_weight(out, precision, self.schemes)
        rows = torch.from_numpy(np.ascontiguousarray(out[inv.reshape(-1)]).reshape(*self.ids.shape, -1))
        return _scale_embedded(self.spec, rows)

    def layer(self, i: int, linears: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        """Decoder layer i as the FP16 model computes it; the source's float32 arrays are
        dropped as each is converted, so one copy of the layer is held. linears: HF linear ->
        the weight to hold instead of the source's, which are then not read (streamed quality
        sets the store's weights on every module before each run)."""
        linear = {f"{n}.weight" for n in LINEAR_NAMES}
        tensors = self.source.layer_tensors(i, linears=linears is None)
        # the source's linears stay until the next layer is read when their quantized
        # candidates are still to be made (one read of the layer, whatever the number of
        # candidates); once all are kept on disk (whole-plan passes, the store) they would be
        # a fourth float32 copy of the layer: 0.9 GB at 8B, past the 6 GiB a build may hold
        self._linears = (i, {k[:-len(".weight")]: tensors[k] for k in linear}
                         if linears is None and not self._candidates_kept(i) else {})
        state = {f"{n}.weight": w for n, w in (linears or {}).items()}
        for k in list(tensors):
            v = tensors.pop(k)
            state[k] = (self._fp16_model(layer_key(i, k), v).to(self.device, self.dtype)
                        if k in linear else self._t(np.asarray(v, np.float32)))
            del v
        with torch.device("meta"):
            layer = self.layer_cls(self.config, i)
        layer.load_state_dict(module_state(self.spec, state), strict=True, assign=True)
        return layer.eval().requires_grad_(False)

    def run(self, layer, i: int, h: torch.Tensor) -> torch.Tensor:
        return run_layer(layer, h, self.mask(i), self.positions, self.rotary[i])

    def weight(self, i: int, name: str) -> np.ndarray:
        """The source's float32 weight of HF linear `name` of layer i. For the layer last read it
        is held once read (the estimate's Q(W) - W asks for each linear at every precision),
        read on first use where layer() did not keep it (its candidates were kept)."""
        held = getattr(self, "_linears", (None, {}))
        if held[0] != i:
            return self.source.tensor(layer_key(i, f"{name}.weight"))
        if name not in held[1]:
            held[1][name] = self.source.tensor(layer_key(i, f"{name}.weight"))
        return held[1][name]

    def _fp16_model(self, name: str, a: np.ndarray) -> torch.Tensor:
        """float32 tensor of source tensor `name`, read as `a`, as the FP16 model holds it
        (ModelSource.as_fp16_model: a float16 checkpoint's weights are not rounded again; that
        cast every weight of a 7B layer three times a pass, 56 s of its estimate)."""
        return _as_tensor(self.source.as_fp16_model(name, a))

    def _candidates_kept(self, i: int) -> bool:
        from .quantize import candidate_path

        return self.candidates is not None and all(
            candidate_path(self.candidates, i, n, p).is_file()
            for n in LINEAR_NAMES for p in QUANTIZED if p in self.schemes)

    def delta(self, i: int, members: Sequence[str], act_stats: dict, precision: str
              ) -> torch.Tensor:
        """float32 [N, K] on the CPU: Q(W) - W of one transformers module (its HF members
        stacked by rows), exactly the weight change a graph at `precision` computes with (as
        KLMeter quantizes). With a candidate folder each quantization is made once per build
        and read back after (the clipping search costs more than the layer's forward)."""
        out = [self._dequantized(i, n, act_stats, precision).sub_(
            self._fp16_model(layer_key(i, f"{n}.weight"), self.weight(i, n))) for n in members]
        return torch.cat(out) if len(out) > 1 else out[0]

    def quantized(self, i: int, members: Sequence[str], act_stats: dict, precision: str
                  ) -> torch.Tensor:
        """Q(W) of one transformers module in the compute dtype on the device: the weight a
        graph at `precision` computes with (a whole-plan pass needs the weight, not the change)."""
        out = [self._dequantized(i, n, act_stats, precision) for n in members]
        q = torch.cat(out) if len(out) > 1 else out[0]
        return q.to(self.device, self.dtype).contiguous()   # a padded K leaves a strided view

    def _dequantized(self, i: int, name: str, act_stats: dict, precision: str) -> torch.Tensor:
        act = act_stats.get(_stats_key(i, name))
        return _dequantized(self._quantized_linear(i, name, precision, act))

    def _quantized_linear(self, i: int, name: str, precision: str, act):
        from .quantize import candidate_path, load_candidate, quantize, save_candidate

        scheme = self.schemes[precision]
        path = None
        if self.candidates is not None:
            path = candidate_path(self.candidates, i, name, precision)
            kept = load_candidate(path, scheme)   # None if cut short by a kill: made again
            if kept is not None:
                return kept
        qt = quantize(self.weight(i, name), scheme, **({"act": act} if act is not None else {}))
        if path is not None:
            save_candidate(path, qt)
        return qt

    def head_chunks(self, dtype=None, precision: str = "fp16"):
        """(first row, head rows in `dtype`, the compute dtype by default) over the vocabulary:
        the FP16 head, or the head as a graph at `precision` computes with it."""
        for a in range(0, self.vocab, HEAD_CHUNK):
            rows = torch.from_numpy(np.ascontiguousarray(
                self._rows(self.head_name, a, min(self.vocab, a + HEAD_CHUNK), precision)))
            yield a, rows.to(self.device, dtype or self.dtype)

    def logits_of(self, normed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        z = normed @ rows.T
        cap = self.spec.final_logit_softcapping
        return z if not cap else torch.tanh(z / cap) * cap


def _scale_embedded(spec, rows: torch.Tensor) -> torch.Tensor:
    """Gemma scales embeddings by sqrt(hidden): the same arithmetic as layerwise.embed."""
    return rows if spec.embed_scale is None else rows * torch.tensor(spec.embed_scale, dtype=rows.dtype)


def _part_of(module: str) -> str:
    """Stored part (qkv, o, gate_up, down) of transformers' linear module `module`."""
    return LINEAR_PART[STORED_OF[module.rsplit(".", 1)[-1]]]


class _Hidden:
    """The FP16 hidden state entering each layer (and leaving the last), in RAM or in a
    memory-mapped file when larger than MEMMAP_BYTES (a checkpoint's own file when `path` is
    given: its suffix says the dtype). Stored as float16, the FP16 model's own type, unless a
    state passes float16's 65,504 (Gemma's residual at BOS reaches about 1.0e5): the store is
    then widened to float32 (the states already written exactly) and keeps float32 from there."""

    SUFFIX = {np.dtype(np.float16): ".f16", np.dtype(np.float32): ".f32"}

    def __init__(self, L: int, shape: tuple, workdir: str | os.PathLike | None,
                 path: Path | None = None, reuse: bool = False, dtype=np.float16):
        self.full, self.workdir, self.stem = (L + 1, *shape), workdir, path
        self.path, self.kept, self.complete, self.on_finish = None, None, False, None
        self.a = self._new(np.dtype(dtype), reuse)
        self.complete = reuse and path is not None

    def _new(self, dtype: np.dtype, reuse: bool = False) -> np.ndarray:
        if self.stem is not None:   # a checkpoint's file: kept (close() leaves it in place)
            self.kept = Path(self.stem).with_suffix(self.SUFFIX[dtype])
            return np.memmap(self.kept, dtype=dtype, mode="r+" if reuse else "w+", shape=self.full)
        if dtype.itemsize * int(np.prod(self.full)) > MEMMAP_BYTES:
            d = Path(self.workdir) if self.workdir else Path(tempfile.gettempdir())
            d.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="lsaq-hidden-", suffix=self.SUFFIX[dtype], dir=d)
            os.close(fd)
            self.path = Path(name)
            return np.memmap(self.path, dtype=dtype, mode="w+", shape=self.full)
        return np.empty(self.full, dtype)

    def _widen(self, written: int) -> None:
        """float16 -> float32 storage; states 0..written-1 copied (widening is exact)."""
        old, old_files = self.a, [p for p in (self.path, self.kept) if p is not None]
        self.path = self.kept = None
        self.a = self._new(np.dtype(np.float32))
        for j in range(written):
            self.a[j] = old[j]
        del old
        for p in old_files:
            p.unlink(missing_ok=True)

    def finish(self) -> None:
        """Every hidden state is written (a checkpoint marks the file reusable)."""
        if isinstance(self.a, np.memmap):
            self.a.flush()
        self.complete = True
        if self.on_finish:
            self.on_finish()

    def put(self, i: int, sl: slice, h: torch.Tensor) -> None:
        """State i (written in order: 0, 1, ...) for windows `sl`."""
        h = h.detach().to("cpu")
        if not torch.isfinite(h).all():
            raise LsaqError(f"the hidden state entering layer {i} is not finite: the weights "
                            f"hold NaN/inf, or it overflowed the compute dtype ({h.dtype}); "
                            "compute in float32 (--fisher-dtype float32)")
        s = h.to(torch.float16 if self.a.dtype == np.float16 else torch.float32)
        if not torch.isfinite(s).all():
            self._widen(i)
            s = h.to(torch.float32)
        self.a[i, sl] = s.numpy()

    def get(self, i: int, sl: slice) -> np.ndarray:
        return np.asarray(self.a[i, sl])

    def close(self) -> None:
        if self.path is not None:
            del self.a
            self.path.unlink(missing_ok=True)
            self.path = None


# ---------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """Raw per-(probe, window, layer, part, precision) terms of a streamed estimate.

    first[s, w, i, j, k]: g . do of probe s in window w for part PARTS[j] of layer i at
        precision QUANTIZED[k] (summed over the part's modules, positions and outputs);
    outdiag[...]: sum of (g * do)^2 elementwise (a diagonal-Fisher variant, output space);
    local[w, i, j, k]: |do|^2 and out_sq[w, i, j]: |o|^2 (local output error, no gradient).
    Costs are per predicted token, like KLMeter's mean KL."""
    first: np.ndarray
    outdiag: np.ndarray
    local: np.ndarray
    out_sq: np.ndarray
    tokens: int
    seconds: float
    params: dict = field(default_factory=dict)
    first_layer: int | None = None   # a resumed run measured layers below this one only

    @property
    def num_layers(self) -> int:
        return self.local.shape[1]

    def cost(self, kind: str = "fisher", units: tuple[str, ...] = GRANULARITY["linear"],
             probes: int | None = None) -> dict[str, list[dict[str, float]]]:
        """unit -> per layer {precision: estimated mean KL}. kind "fisher": 1/2 E[(g . do)^2]
        (the estimate); "outdiag": its diagonal in output space; "local": |do|^2 (no scale)."""
        idx = {u: [PARTS.index(LINEAR_PART[lin]) for lin in UNITS[u]] for u in units}
        s = slice(None, probes)
        out = {u: [dict() for _ in range(self.num_layers)] for u in units}
        for u, js in idx.items():
            if kind == "fisher":
                a = self.first[s][:, :, :, js].sum(axis=3)          # [S, n, L, P]
                v = 0.5 * (a ** 2).sum(axis=1).mean(axis=0)         # [L, P]
            elif kind == "outdiag":
                v = 0.5 * self.outdiag[s][:, :, :, js].sum(axis=(1, 3)).mean(axis=0)
            elif kind == "local":
                v = self.local[:, :, js].sum(axis=(0, 2))
            else:
                raise LsaqError(f"estimate kind {kind!r}: use fisher, outdiag or local")
            for i in range(self.num_layers):
                out[u][i] = {p: float(v[i, k]) / self.tokens for k, p in enumerate(QUANTIZED)}
        return out

    def sensitivity(self, kind: str = "fisher", units: tuple[str, ...] = GRANULARITY["linear"],
                    probes: int | None = None) -> Sensitivity:
        """The costs in the form the knapsack (sensitivity.allocate_rungs) consumes."""
        return Sensitivity(self.cost(kind, units, probes), self.tokens, self.seconds,
                           {"measure": kind, **self.params})


def estimate(source: ModelSource, windows: np.ndarray, schemes: dict[str, QuantScheme],
             act_stats: dict | None = None, *, probes: int = 8, seed: int = 0,
             device: str = "cpu", dtype=None, batch_size: int = PASS_BATCH,
             workdir: str | os.PathLike | None = None, progress: ProgressFn | None = None,
             on_layer: Callable[[int, dict], None] | None = None,
             checkpoint: "Checkpoint | None" = None,
             candidates: str | os.PathLike | None = None,
             kept: "PlanStates | None" = None) -> Estimate:
    """Streamed estimate of every stored linear's KL cost at INT8 and INT4 (module docstring).

    windows: int64 [samples, seq_len] calibration token ids; act_stats: the clip 'mse-act'
    statistics (activations.activation_stats), as the quantizers need them; probes: label sets
    drawn per window (0: only the local output errors, one forward pass); device: auto, cpu or
    cuda; dtype: compute dtype (float32 on the CPU, float16 on CUDA by default); workdir: where
    large hidden states are memory-mapped (a temporary folder by default; the file is removed).
    on_layer(i, record): called after layer i's terms are final (a resumable job saves them).
    checkpoint: keep the stored hidden states and the probes' gradient in a folder, so that a
    killed run continues the backward sweep at the layer it reached (see Checkpoint); the
    layers above it are then not measured again and their terms are zero in the result
    (`Estimate.first_layer` says from where they are real: the caller has the others).
    candidates: a folder keeping every quantized linear, made once and read back by later
    passes (plans_kl) and by a resumed run. kept: the FP16 reference's states kept by an
    earlier pass (PlanStates): the forward reads them instead of computing them again."""
    dev = _device(device)
    dt = _dtype(dev, dtype)
    if probes < 0:
        raise LsaqError(f"probes must be >= 0, not {probes}")
    t0 = time.perf_counter()
    act_stats = act_stats or {}
    st = _Stack(source, windows, dev, dt, schemes, candidates)
    L, n, T, S = st.spec.num_layers, st.n, st.seq_len, probes
    P = len(QUANTIZED)
    first = np.zeros((S, n, L, len(PARTS), P))
    outdiag = np.zeros_like(first)
    local = np.zeros((n, L, len(PARTS), P))
    out_sq = np.zeros((n, L, len(PARTS)))
    clock = _Clock(L, S, progress, dev)
    batches = [slice(b, min(n, b + batch_size)) for b in range(0, n, batch_size)]

    def output_changes(i: int, caps: dict) -> dict:
        """do = x (Q(W) - W)^T of every module and precision over all windows (caps: module ->
        (x, o) of every window), quantizing one module at a time so that only its candidates
        are held; adds the local terms."""
        dO = {}
        for m, (x, o) in caps.items():
            j = PARTS.index(_part_of(m))
            out_sq[:, i, j] += o.float().square().sum(dim=(1, 2)).cpu().numpy()
            for k, p in enumerate(QUANTIZED):
                dW = st.delta(i, st.modules[m], act_stats, p).to(st.device, st.dtype)
                d = dO[m, p] = x @ dW.T
                del dW
                local[:, i, j, k] += d.float().square().sum(dim=(1, 2)).cpu().numpy()
        return dO

    def forward_all(layer, i: int, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """No-grad forward of every window through layer i: (output, module -> (x, o))."""
        outs, caps = [], []
        with torch.no_grad():
            for sl in batches:
                c = _capture(layer, st.modules)
                outs.append(st.run(layer, i, h[sl]))
                caps.append(c.done())
        return torch.cat(outs), {m: tuple(torch.cat([c[m][r] for c in caps]) for r in (0, 1))
                                 for m in caps[0]}

    hidden = None
    top_layer = L      # the backward starts below this layer
    try:
        if S == 0:   # local errors only: one forward sweep, quantizing as it goes
            h = st.embedded().to(dev, dt)
            for i in range(L):
                layer = st.layer(i)
                h, caps = forward_all(layer, i, h)
                with torch.no_grad():
                    output_changes(i, caps)
                del layer, caps
                clock.tick("local", i + 1, t0)
            return Estimate(first, outdiag, local, out_sq, st.tokens, time.perf_counter() - t0,
                            _params(schemes, S, seed, dev, dt))

        shape = (n, T, st.spec.hidden_size)
        G = None
        if checkpoint is not None:
            hidden = checkpoint.hidden(L, shape)
            resumed = checkpoint.gradient(S, shape) if hidden.complete else None
            if resumed is not None:
                top_layer, g = resumed
                G = torch.from_numpy(g).to(dev)
                clock.skip(L - top_layer)
        else:
            hidden = _Hidden(L, shape, workdir)

        if not hidden.complete:
            # 1. forward, storing every layer's input
            h = st.embedded().to(dev, dt)
            hidden.put(0, slice(None), h)
            tf = time.perf_counter()
            for i in range(L):
                ref = ("fp16",) * (i + 1)
                if kept is not None and kept.has(st, "fp16", ref):
                    h = kept.get(st, "fp16", ref)   # the same arithmetic, done by an earlier pass
                else:
                    layer = st.layer(i)
                    with torch.no_grad():
                        h = torch.cat([st.run(layer, i, h[sl]) for sl in batches])
                    del layer
                    if kept is not None:
                        kept.put(st, "fp16", ref, h)
                hidden.put(i + 1, slice(None), h)
                clock.tick("forward", i + 1, tf)
            del h
            hidden.finish()
        else:
            clock.skip_forward()

        if G is None:
            # 2. the probes' gradient at the top of the stack
            G = torch.zeros((S, *shape), dtype=torch.float32, device=dev)
            gens = [torch.Generator().manual_seed(seed * 1_000_003 + s) for s in range(S)]
            top = torch.from_numpy(hidden.get(L, slice(None))[:, :-1]).to(dev)
            G[:, :, :-1] = _head_grad(st, top.reshape(-1, top.shape[-1]), gens).reshape(
                S, n, T - 1, -1)
            del top

        # 3. backward, one layer at a time from the top
        tb = time.perf_counter()
        for i in reversed(range(top_layer)):
            layer = st.layer(i)
            newG = torch.empty_like(G)
            one = len(batches) == 1   # then the forward that records the graph gives x too
            if not one:
                _, caps = forward_all(layer, i, torch.from_numpy(hidden.get(i, slice(None))).to(dev, dt))
                with torch.no_grad():
                    dO = output_changes(i, caps)
                del caps
            for sl in batches:
                h = torch.from_numpy(hidden.get(i, sl)).to(dev, dt).requires_grad_(True)
                with torch.enable_grad():
                    c = _capture(layer, st.modules)
                    out = st.run(layer, i, h)
                    cap = c.done()
                if one:
                    with torch.no_grad():
                        dO = output_changes(i, cap)
                mods = list(cap)
                outs = [cap[m][1] for m in mods]
                for s in range(S):
                    # a power-of-two scale bringing the largest incoming gradient to ~1: exact,
                    # and keeps float16's small gradients from underflowing
                    scale = _pow2_scale(G[s, sl])
                    grads = torch.autograd.grad(out, [h, *outs],
                                                grad_outputs=(G[s, sl] * scale).to(dt),
                                                retain_graph=s < S - 1, allow_unused=True)
                    newG[s, sl] = grads[0].float() / scale
                    with torch.no_grad():
                        for m, g in zip(mods, grads[1:]):
                            if g is None:
                                continue
                            j = PARTS.index(_part_of(m))
                            g = g.float() / scale
                            for k, p in enumerate(QUANTIZED):
                                gd = g * dO[m, p][sl if not one else slice(None)].float()
                                first[s, sl, i, j, k] += gd.sum(dim=(1, 2)).cpu().numpy()
                                outdiag[s, sl, i, j, k] += gd.square().sum(dim=(1, 2)).cpu().numpy()
                del out, cap, outs, h
            G = newG
            del layer, dO
            if not (np.isfinite(first[:, :, i]).all() and np.isfinite(local[:, i]).all()):
                raise LsaqError(f"estimate: non-finite terms at layer {i}; the weights hold "
                                "NaN/inf or the compute dtype overflowed")
            if on_layer:
                on_layer(i, {"first": first[:, :, i], "outdiag": outdiag[:, :, i],
                             "local": local[:, i], "out_sq": out_sq[:, i], "tokens": st.tokens})
            if checkpoint is not None:   # after on_layer: a kill between them measures i again
                checkpoint.save_gradient(i, G)
            clock.tick("backward", L - i, tb)
    finally:
        if hidden is not None and checkpoint is None:
            hidden.close()
    return Estimate(first, outdiag, local, out_sq, st.tokens, time.perf_counter() - t0,
                    _params(schemes, S, seed, dev, dt), first_layer=top_layer)


class Checkpoint:
    """The resumable state of an estimate in a folder (a build's job folder): the stored
    hidden states (a memory-mapped file, marked complete once the forward pass wrote all of
    them) and the probes' gradient entering the layer the backward sweep reached. Each file
    carries `key` (the measurement's fingerprint): state of other inputs is never reused."""

    HIDDEN, GRAD = "fisher-hidden", "fisher-grad.npy"   # fisher-hidden.f16 or .f32 (_Hidden)

    def __init__(self, folder: str | os.PathLike, key: str):
        self.folder, self.key = Path(folder), key
        self.folder.mkdir(parents=True, exist_ok=True)

    def _meta(self, name: str) -> dict:
        try:
            d = json.loads((self.folder / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) and d.get("key") == self.key else {}

    def _write_meta(self, name: str, meta: dict) -> None:
        from .job import write_json_atomic

        write_json_atomic(self.folder / f"{name}.json", {"key": self.key, **meta})

    def hidden(self, L: int, shape: tuple) -> "_Hidden":
        full = [L + 1, *shape]
        meta = self._meta(self.HIDDEN)
        stem = self.folder / self.HIDDEN
        dtype = np.dtype(meta.get("dtype") if meta.get("dtype") in ("float16", "float32")
                         else "float16")
        done = (meta.get("shape") == full and meta.get("complete") is True
                and stem.with_suffix(_Hidden.SUFFIX[dtype]).is_file())
        h = _Hidden(L, shape, None, path=stem, reuse=done, dtype=dtype)
        h.on_finish = lambda: self._write_meta(self.HIDDEN, {"shape": full, "complete": True,
                                                             "dtype": str(h.a.dtype)})
        if not done:
            self._write_meta(self.HIDDEN, {"shape": full, "complete": False})
        return h

    def gradient(self, probes: int, shape: tuple) -> tuple[int, np.ndarray] | None:
        """(layer, gradient entering from above it) saved by a killed run, or None."""
        meta = self._meta(self.GRAD)
        path = self.folder / self.GRAD
        if not path.is_file() or not isinstance(meta.get("layer"), int):
            return None
        try:
            g = np.load(path)
        except (OSError, ValueError):
            return None
        if g.shape != (probes, *shape) or meta.get("sha256") != _digest(g):
            return None
        return meta["layer"], g

    def save_gradient(self, layer: int, G: torch.Tensor) -> None:
        g = G.detach().to("cpu", torch.float32).numpy()
        part = self.folder / f".{self.GRAD}.part"
        with open(part, "wb") as f:
            np.save(f, g)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, self.folder / self.GRAD)
        self._write_meta(self.GRAD, {"layer": layer, "sha256": _digest(g)})

    def drop_gradient(self) -> None:
        for p in (self.folder / self.GRAD, self.folder / f"{self.GRAD}.json"):
            p.unlink(missing_ok=True)

    def clear(self) -> None:
        for p in (self.folder / f"{self.HIDDEN}.f16", self.folder / f"{self.HIDDEN}.f32",
                  self.folder / f"{self.HIDDEN}.json", self.folder / self.GRAD,
                  self.folder / f"{self.GRAD}.json"):
            p.unlink(missing_ok=True)


def _digest(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _pow2_scale(g: torch.Tensor) -> float:
    m = float(g.abs().max())
    return 2.0 ** -math.frexp(m)[1] if m > 0 and math.isfinite(m) else 1.0


def _params(schemes, probes, seed, dev, dt) -> dict:
    return {"int8": schemes["int8"].name, "int4": schemes["int4"].name, "probes": probes,
            "seed": seed, "device": dev.type, "dtype": str(dt).removeprefix("torch.")}


class _capture:
    """Forward hooks keeping each linear module's input and output of the next forward."""

    def __init__(self, layer, modules):
        self.caps, self.handles = {}, []
        for m in modules:
            def hook(mod, args, out, m=m):
                self.caps[m] = (args[0], out)
            self.handles.append(layer.get_submodule(m).register_forward_hook(hook))

    def done(self) -> dict:
        for h in self.handles:
            h.remove()
        return self.caps


def _head_grad(st: _Stack, top: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
    """float32 [S, N, hidden]: gradient of sum log p(y) w.r.t. the final hidden states `top`
    [N, hidden] (every predicted position of every window) for S = len(gens) label sets y ~ p.
    The head is read HEAD_CHUNK rows at a time, twice, and computed in float32 whatever the
    compute dtype.

    Labels by Gumbel-max: probe s's noise comes from its own CPU generator (a run with more
    probes starts with the same ones; any device draws the same labels, and a small change of
    the logits rarely changes an argmax). dlogp(y)/dz = e_y - p and z = cap(normed @ head^T),
    so the gradient w.r.t. the normed state is c_y head[y] - sum_v p_v c_v head[v] with
    c = dz/d(normed @ head^T)."""
    S, N = len(gens), top.shape[0]
    x = top.detach().float().requires_grad_(True)
    with torch.enable_grad():
        normed = final_norm(st.spec, x, st.norm.float())
    nd = normed.detach()
    cap = st.spec.final_logit_softcapping
    lse = torch.full((N,), -math.inf, device=st.device)
    best = torch.full((S, N), -math.inf, device=st.device)
    label = torch.zeros((S, N), dtype=torch.long, device=st.device)
    for a, rows in st.head_chunks(torch.float32):        # pass 1: normaliser and labels
        z = st.logits_of(nd, rows)
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        for s, gen in enumerate(gens):
            u = torch.rand(z.shape, generator=gen).clamp_(1e-20, 1.0)
            m, arg = (z - torch.log(-torch.log(u)).to(st.device)).max(-1)
            take = m > best[s]
            best[s] = torch.where(take, m, best[s])
            label[s] = torch.where(take, arg + a, label[s])
    mean = torch.zeros(N, nd.shape[1], device=st.device)
    pick = torch.zeros(S, N, nd.shape[1], device=st.device)
    for a, rows in st.head_chunks(torch.float32):        # pass 2: both terms
        raw = nd @ rows.T
        z = torch.tanh(raw / cap) * cap if cap else raw
        c = 1 - torch.tanh(raw / cap) ** 2 if cap else torch.ones_like(raw)
        mean += (torch.exp(z - lse[:, None]) * c) @ rows
        hit = (label >= a) & (label < a + rows.shape[0])
        if hit.any():
            s_idx, t_idx = hit.nonzero(as_tuple=True)
            v = label[s_idx, t_idx] - a
            pick[s_idx, t_idx] = c[t_idx, v][:, None] * rows[v]
    g_normed = pick - mean[None]
    out = torch.empty(S, N, x.shape[1], device=st.device)
    for s in range(S):
        out[s] = torch.autograd.grad(normed, x, g_normed[s], retain_graph=s < S - 1)[0]
    return out


def layer_costs(first: np.ndarray, tokens: int, units: tuple[str, ...] = GRANULARITY["linear"]
                ) -> dict[str, dict[str, float]]:
    """unit -> {precision: estimated mean KL} of one layer from its first-order terms
    first[s, w, part, precision] (Estimate.first[:, :, i]): 1/2 E_s[sum_w (sum over the unit's
    parts of g . do)^2] per predicted token."""
    out = {}
    for u in units:
        js = [PARTS.index(LINEAR_PART[lin]) for lin in UNITS[u]]
        a = first[:, :, js].sum(axis=2)                      # [S, n, P]
        v = 0.5 * (a ** 2).sum(axis=1).mean(axis=0)          # [P]
        out[u] = {p: float(v[k]) / tokens for k, p in enumerate(QUANTIZED)}
    return out


def estimate_sensitivity(source: ModelSource, windows: np.ndarray,
                         schemes: dict[str, QuantScheme], act_stats: dict | None = None,
                         units: tuple[str, ...] = GRANULARITY["linear"], **kw) -> Sensitivity:
    """`estimate` with the Fisher costs in the Sensitivity form the knapsack consumes."""
    return estimate(source, windows, schemes, act_stats, **kw).sensitivity("fisher", units)


def table_costs(source: ModelSource, windows: np.ndarray, schemes: dict[str, QuantScheme],
                names: Sequence[str], **kw) -> dict[str, dict[str, float]]:
    """The token tables' costs, measured exactly (the KL KLMeter gives) in one streamed pass:
    a quantized embedding changes every layer's input, so it is one more carried state per
    precision; an untied head only changes the last projection."""
    plans = [(("fp16",) * source.spec.num_layers, {t: p}) for t in names for p in QUANTIZED]
    kl = plans_kl(source, windows, schemes, plans, **kw) if plans else []
    it = iter(kl)
    return {t: {p: next(it) for p in QUANTIZED} for t in names}


def score(source: ModelSource, calibration, windows: np.ndarray, schemes: dict[str, QuantScheme],
          act_stats: dict | None = None, progress: Callable[[str], None] | None = None,
          granularity: str = "linear", tables: bool = False, log=None, probes: int = 16,
          seed: int = 0, device: str = "cpu", dtype=None, checkpoint_dir=None,
          probe_dtype=None, **kw):
    """Scores (metric "sensitivity", params.measure "fisher") as sensitivity.score returns
    them, so build_bundle(scores=...) and sensitivity.from_scores take them unchanged; with
    `tables` the token tables' costs too (measured exactly: a few streamed passes).

    log: a job.MeasurementLog to continue and append to (each layer's unit costs once its
    backward step is done, each table's once measured); checkpoint_dir: where the hidden
    states and the probes' gradient are kept so that a killed build resumes the sweep (both
    keyed by the log's fingerprint); probe_dtype: the estimate's compute dtype where it
    differs from `dtype` (the tables' exact KLs keep `dtype`)."""
    from .importance import Scores

    if granularity not in GRANULARITY:
        raise LsaqError(f"sensitivity granularity {granularity!r}: use "
                        f"{' or '.join(map(repr, GRANULARITY))}")
    units = GRANULARITY[granularity]
    say = progress or (lambda m: None)
    known = {}
    if log is not None:
        log.start()
        known = log.read()
        if known:
            say(f"resuming: reusing {len(known)} finished measurements from {log.path}")
    L = source.spec.num_layers
    t0 = time.perf_counter()
    names = sensitivity.table_units(source.spec, source) if tables else ()
    tcost = {t: known[("table", t)] for t in names
             if ("table", t) in known and set(QUANTIZED) <= set(known[("table", t)])}
    todo = [t for t in names if t not in tcost]
    kept = None
    if checkpoint_dir is not None:
        from .job import PLAN_STATES

        # the FP16 reference's states (the activation pass keeps them where it computes what
        # the passes compute: reference_sink): every pass after the first reads them, and
        # the plans' first pass starts from them
        kept = PlanStates(Path(checkpoint_dir) / PLAN_STATES, keep=lambda e, prefix: e == "fp16")
    if todo:
        say(f"token tables {', '.join(todo)}: exact KL at {'/'.join(QUANTIZED)} in one "
            "streamed pass")
        folder = None
        if checkpoint_dir is not None:
            from .job import CANDIDATES

            # the quantized head is made here once, for every later pass and the store
            folder = Path(checkpoint_dir) / CANDIDATES
        got = table_costs(source, windows, schemes, todo, act_stats=act_stats, device=device,
                          dtype=dtype, progress=lambda step: say(f"tables {step}"), kept=kept,
                          candidates=folder, **kw)
        for t, c in got.items():
            tcost[t] = c
            if log is not None:
                log.append(("table", t), c)
            say(f"{t} table: " + ", ".join(f"{p} {c[p]:.2e}" for p in QUANTIZED))

    def have(i: int) -> bool:
        return all(("layer", i, u) in known and set(QUANTIZED) <= set(known[("layer", i, u)])
                   for u in units)

    cost = {u: [dict() for _ in range(L)] for u in units}
    for i in range(L):
        if have(i):
            for u in units:
                cost[u][i] = {p: known[("layer", i, u)][p] for p in QUANTIZED}

    def on_layer(i: int, rec: dict) -> None:
        c = layer_costs(rec["first"], rec["tokens"], units)
        for u in units:
            cost[u][i] = c[u]
            if log is not None:
                log.append(("layer", i, u), c[u])

    seconds = 0.0
    if not all(have(i) for i in range(L)):
        from .job import CANDIDATES, fingerprint

        ckpt = None
        if checkpoint_dir is not None:
            ckpt = Checkpoint(checkpoint_dir, fingerprint([getattr(log, "key", None), probes,
                                                           seed, granularity]))
            top = ckpt._meta(Checkpoint.GRAD).get("layer")
            if isinstance(top, int) and not all(have(j) for j in range(top, L)):
                ckpt.drop_gradient()   # a layer above it lacks its logged costs: from the top
        est = estimate(source, windows, schemes, act_stats, probes=probes, seed=seed,
                       device=device, dtype=probe_dtype or dtype, on_layer=on_layer, checkpoint=ckpt,
                       candidates=Path(checkpoint_dir) / CANDIDATES if checkpoint_dir else None,
                       kept=kept, progress=lambda step: say(str(step)), **kw)
        # a resumed sweep starts below the layers the log holds: they must all be there
        missing = [i for i in range(L) if not cost[units[0]][i]]
        if missing:
            raise LsaqError(f"fisher measurement: layers {missing[:5]} were not measured (a "
                            "resumed sweep without their logged costs); build without --resume")
        if ckpt is not None:
            ckpt.clear()
        seconds = est.seconds
    sens = Sensitivity(cost, (np.asarray(windows).shape[1] - 1) * len(windows),
                       time.perf_counter() - t0 if not seconds else seconds,
                       tables=tcost)
    sensitivity.check_finite(sens)
    spec = source.spec
    model = {"name": spec.name, "architecture": spec.architecture, "num_layers": spec.num_layers,
             "fingerprint": source.fingerprint()}
    calib = {"source": calibration.source, "sha256": calibration.sha256,
             "samples": int(len(windows)), "seq_len": int(np.asarray(windows).shape[1])}
    params = {"int8": schemes["int8"].name, "int4": schemes["int4"].name, **sens.to_json(),
              "measure": "fisher", "probes": probes, "seed": seed,
              "dtype": str(_dtype(_device(device), probe_dtype or dtype)).removeprefix("torch.")}
    return Scores(metric="sensitivity", params=params, calibration=calib, model=model,
                  importance=sens.layer_importance())


# ---------------------------------------------------------------------------- whole plans
class PlanStates:
    """Whole-plan hidden states kept in a folder between passes: the state leaving layer i of
    a plan depends only on the plan's first i + 1 precisions (and its embedding's), so a
    refinement round's swap candidates, which are their rung's plan with two parts swapped,
    start from the rung's state below the first part swapped, and no pass runs the FP16
    reference again. A resumed build's first pass finds them too. One file a state (.part then
    rename: a kill leaves no half state); the key holds the windows, the device and the dtype.
    The FP16 reference's states come from the first pass that computes them: the activation
    statistics' (reference_sink), else the token tables'.
    At Llama-2-7B shapes and 4 x 128 tokens a state is 8 MiB: the first pass's 11 plans keep
    2.8 GB."""

    def __init__(self, folder: str | os.PathLike | None = None,
                 keep: bool | Callable[[str, tuple], bool] = True):
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lsaq-plan-states-")
            folder = self._tmp.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = keep   # which states a pass keeps: all, none, or keep(embedding, precisions)
        self._have = {p.name for p in self.folder.glob("*.pt")}

    @staticmethod
    def _name(facts: tuple, e: str, prefix: tuple) -> str:
        import hashlib

        key = repr((*facts, e, tuple(prefix)))
        return f"{len(prefix) - 1:03d}.{hashlib.sha1(key.encode()).hexdigest()[:20]}.pt"

    def has(self, st: "_Stack", e: str, prefix: tuple) -> bool:
        return self._name(st.state_facts, e, prefix) in self._have

    def get(self, st: "_Stack", e: str, prefix: tuple) -> torch.Tensor:
        return torch.load(self.folder / self._name(st.state_facts, e, prefix),
                          map_location=st.device)

    def put(self, st: "_Stack", e: str, prefix: tuple, h: torch.Tensor) -> None:
        self.put_state(st.state_facts, e, prefix, h)

    def put_state(self, facts: tuple, e: str, prefix: tuple, h: torch.Tensor) -> None:
        """Keep state h under `facts` (state_facts: device, dtype, windows) of a pass that
        holds no _Stack (the activation pass: reference_sink)."""
        if not (self.keep(e, prefix) if callable(self.keep) else self.keep):
            return
        name = self._name(facts, e, prefix)
        if name in self._have:
            return
        part = self.folder / f".{name}.part"
        torch.save(h.detach().cpu(), part)
        os.replace(part, self.folder / name)
        self._have.add(name)

    def close(self) -> None:
        import shutil

        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self._have = set()


def state_facts(device: torch.device, dtype: torch.dtype, windows) -> tuple:
    """What a kept state's name holds besides the plan: the device kind, the dtype and the
    windows (a state computed elsewhere is never mistaken for this one)."""
    return (torch.device(device).type, str(dtype), _digest(np.asarray(windows, np.int64)))


def reference_sink(source: ModelSource, windows: np.ndarray, folder: str | os.PathLike
                   ) -> Callable[[int, torch.Tensor], None] | None:
    """A callback (i, h) keeping h as the FP16 reference's state leaving layer i in the plan
    state folder, for a pass over `windows` that computes what the passes compute: the
    activation statistics' forward (transformers' layers, PASS_BATCH windows at a time, the
    device's dtype), so the tables' pass, the estimate's forward and the plans' first pass
    do not run the FP16 model again (three of a 7B build's passes: about 150 s here). None
    where the arithmetic would differ: a source whose linears or embedding are not stored as
    float16 (the passes compute with them rounded to float16, the activation pass as read)."""
    spec = source.spec
    names = [EMBED] + [layer_key(i, f"{n}.weight") for i in range(spec.num_layers)
                       for n in LINEAR_NAMES]
    if not all(source.stored_as_float16(n) for n in names):
        return None
    states = PlanStates(folder, keep=True)

    def sink(i: int, h: torch.Tensor) -> None:
        if not torch.isfinite(h).all():   # the pass fails (NonFiniteError): nothing to keep
            return
        states.put_state(state_facts(h.device, h.dtype, windows), "fp16", ("fp16",) * (i + 1), h)

    return sink


def _plan_of(plan, L: int, tied: bool) -> tuple[tuple[str, ...], str, str]:
    """(layer precisions, embedding precision, head precision) of a plan given as layer
    precisions or as (layer precisions, {table: precision}); a tied head follows the table."""
    if len(plan) == 2 and isinstance(plan[1], dict):
        prec, tables = tuple(plan[0]), plan[1]
    else:
        prec, tables = tuple(plan), {}
    if len(prec) != L:
        raise LsaqError(f"{len(prec)} precisions for {L} layers")
    e = tables.get("embed_tokens", "fp16")
    return prec, e, e if tied else tables.get("lm_head", "fp16")


def plans_kl(source: ModelSource, windows: np.ndarray, schemes: dict[str, QuantScheme],
             plans: Sequence, act_stats: dict | None = None, *,
             device: str = "cpu", dtype=None, batch_size: int = PASS_BATCH,
             progress: ProgressFn | None = None, stack: "_Stack | None" = None,
             label: str = "plans", kept: PlanStates | None = None,
             candidates=None) -> list[float]:
    """Mean KL(FP16 || plan) per predicted token of every plan (layer precisions, as
    KLMeter.kl takes them, or (layer precisions, {table: precision}) as KLMeter.kl(p, tables)),
    all in one streamed pass: the FP16 state and each plan's state are carried layer by layer
    (plans alike up to a layer share one state up to there), every layer read and each of its
    quantized candidates made once. Compute: at most 1 + plans forward passes; memory: one
    layer, its candidates, the distinct states. kept: states of earlier passes (PlanStates);
    a plan starts above the deepest layer whose state is kept, and this pass's states are
    kept in turn while kept.keep is set. candidates: the build's folder of quantizations made
    once (_Stack), where no stack is given."""
    dev = _device(device)
    dt = _dtype(dev, dtype)
    act_stats = act_stats or {}
    st = stack or _Stack(source, windows, dev, dt, schemes, candidates)
    L = st.spec.num_layers
    tied = st.head_name == EMBED
    ref = ("fp16",) * L
    items = [(ref, "fp16", "fp16")] + [_plan_of(p, L, tied) for p in plans]
    batches = [slice(b, min(st.n, b + batch_size)) for b in range(0, st.n, batch_size)]
    # the layer each item's state is kept after (-1: none; it starts from the embedding)
    start = {(prec, e): next((j for j in reversed(range(L))
                              if kept is not None and kept.has(st, e, prec[:j + 1])), -1)
             for prec, e, _ in items}
    states = {(e, ()): st.embedded(e).to(st.device, st.dtype)
              for e in {e for (_, e), s in start.items() if s < 0}}
    clock = _Clock(L, 0, progress, st.device)
    t0 = time.perf_counter()
    for (prec, e), s in start.items():
        if s == L - 1:
            states[(e, prec)] = kept.get(st, e, prec).to(st.device, st.dtype)
    for i in range(L):
        for (prec, e), s in start.items():
            if s == i - 1 and i > 0 and (e, prec[:i]) not in states:
                states[(e, prec[:i])] = kept.get(st, e, prec[:i]).to(st.device, st.dtype)
        need = {(e, prec[:i + 1]) for (prec, e), s in start.items() if s < i}
        if not need:   # every plan's state is kept above this layer: not even read
            clock.tick(label, i + 1, t0)
            continue
        layer = st.layer(i)
        fp16 = {m: layer.get_submodule(m).weight.data for m in st.modules}
        cache: dict = {}

        def weight(m, prec):
            if prec == "fp16":
                return fp16[m]
            if (m, prec) not in cache:
                cache[m, prec] = st.quantized(i, st.modules[m], act_stats, prec)
            return cache[m, prec]

        new = {}
        with torch.no_grad():
            for e, key in sorted(need, key=lambda k: k[1][-1]):   # alike precisions together
                for m in st.modules:
                    layer.get_submodule(m).weight.data = weight(m, part_precision(key[-1], m))
                h = states[(e, key[:-1])]
                new[(e, key)] = torch.cat([st.run(layer, i, h[sl]) for sl in batches])
                if kept is not None:
                    kept.put(st, e, key, new[(e, key)])
        # states carried on: this layer's, and the whole plans kept (loaded above)
        states = {**{k: v for k, v in states.items() if len(k[1]) == L}, **new}
        del layer, cache, fp16
        clock.tick(label, i + 1, t0)
    return _kl_at_head(st, states, [((e, prec), hp) for prec, e, hp in items])


def _kl_at_head(st: _Stack, states: dict, items: list[tuple]) -> list[float]:
    """Mean KL of items[0]'s next-token distributions to each later item's, an item being
    (state key, head precision); one walk over the head by row chunks (head_sums), each head
    precision quantized by chunk. The logits are float32 whatever the compute dtype: float16
    logits (a GPU's) are rounded by up to 8e-3 at |z| of 16-32, which moved a KL of 3e-7 a
    token to 4e-6 in a simulation, the size of the differences the plans are chosen by."""
    H = st.spec.hidden_size
    normed = {k: final_norm(st.spec, h[:, :-1].float(), st.norm.float()).reshape(-1, H)
              for k, h in states.items() if k in {key for key, _ in items}}
    pairs = sorted(set(items), key=str)
    heads = sorted({hp for _, hp in pairs})

    def walk():
        for chunks in zip(*(st.head_chunks(torch.float32, precision=hp) for hp in heads)):
            yield chunks[0][0], {hp: rows for hp, (_, rows) in zip(heads, chunks)}

    _, kl, _ = head_sums(st, normed, pairs, items[0], walk())
    out = [kl[pr] / st.tokens for pr in items[1:]]
    if not all(math.isfinite(v) for v in out):   # NaN would lose every comparison silently
        raise LsaqError("whole-plan KL is not finite: the weights hold NaN/inf, or the states "
                        f"overflowed the compute dtype ({st.dtype}); compute in float32 "
                        "(--fisher-dtype float32)")
    return out


def head_sums(st: _Stack, x: dict, pairs: Sequence, ref, walk, targets: torch.Tensor | None = None
              ) -> tuple[dict, dict, dict | None]:
    """One walk over the vocabulary (walk: (first row, {head: rows}) per row chunk) for pairs
    (state key, head) of final-normed states x[key] [N, hidden]: per pair the log-normaliser
    at every position, the KL(ref || pair) summed over positions and, given targets [N], the
    targets' logits. float64 past the matmul: KLs of 1e-5 a token must sum exactly.

    KL = sum_v p_v (z_ref - z)_v - lse_ref + lse, with the sum kept relative to the running
    lse_ref (rescaled as that grows, as online softmax does), so every chunk's logits are
    computed once: a normalisers walk then a KL walk did them twice, which at a 128k
    vocabulary was most of a whole-plan pass's head."""
    N = next(iter(x.values())).shape[0]
    f64 = dict(dtype=torch.float64, device=st.device)
    lse = {pr: torch.full((N,), -math.inf, **f64) for pr in pairs}
    acc = {pr: torch.zeros(N, **f64) for pr in pairs if pr != ref}
    zt = {pr: torch.zeros(N, **f64) for pr in pairs} if targets is not None else None
    for a, rows in walk:
        z_ref = st.logits_of(x[ref[0]], rows[ref[1]]).double()
        grown = torch.logaddexp(lse[ref], torch.logsumexp(z_ref, -1))
        w = torch.exp(z_ref - grown[:, None])          # p_v, relative to the lse so far
        keep = torch.exp(lse[ref] - grown)              # 0 at the first chunk
        lse[ref] = grown
        hit = None
        if targets is not None:
            hit = (targets >= a) & (targets < a + z_ref.shape[1])
        for pr in pairs:
            z = z_ref if pr == ref else st.logits_of(x[pr[0]], rows[pr[1]]).double()
            if pr != ref:
                lse[pr] = torch.logaddexp(lse[pr], torch.logsumexp(z, -1))
                acc[pr] = acc[pr] * keep + (w * (z_ref - z)).sum(-1)
            if hit is not None:
                zt[pr][hit] = z[hit, targets[hit] - a]
    kl = {pr: float((acc[pr] - lse[ref] + lse[pr]).sum()) for pr in acc}
    kl[ref] = 0.0
    return lse, kl, zt


class StreamMeter:
    """What the plan stage asks of KLMeter, streamed: whole-plan KLs by `plans_kl` (one pass
    for a batch of plans), holding one layer at a time. `kl_many` lets the ladder's allocation
    batch every plan of a refinement round into one pass."""

    def __init__(self, source: ModelSource, windows: np.ndarray, schemes: dict[str, QuantScheme],
                 act_stats: dict | None = None, *, device: str = "cpu", dtype=None,
                 progress: ProgressFn | None = None, candidates=None,
                 states: str | os.PathLike | None = None):
        self.source, self.spec = source, source.spec
        self.windows, self.schemes, self.act_stats = windows, schemes, act_stats or {}
        dev = _device(device)
        self.stack = _Stack(source, windows, dev, _dtype(dev, dtype), schemes, candidates)
        self.tokens, self.progress = self.stack.tokens, progress
        # the first pass's states (every rung's plan and the FP16 reference) are what later
        # rounds start from; a round's own states are not kept (refinement candidates are
        # their rung's plan with one swap: a 70B's would be tens of GB)
        self.states = PlanStates(states)

    def kl_many(self, plans: Sequence) -> list[float]:
        if not plans:
            return []
        # the count tells a reader of an hour-long log which pass this is (the first measures
        # every rung; refinement passes their candidate swaps)
        try:
            return plans_kl(self.source, self.windows, self.schemes, plans, self.act_stats,
                            stack=self.stack, progress=self.progress,
                            label=f"{len(plans)} plans", kept=self.states)
        finally:
            self.states.keep = False

    def close(self) -> None:
        """Removes the kept states (the plans are chosen)."""
        self.states.close()

    def kl(self, precisions, tables: dict[str, str] | None = None) -> float:
        return self.kl_many([(tuple(precisions), tables or {})])[0]


allocate_rungs = sensitivity.allocate_rungs_batched   # whole plans a round at a time
