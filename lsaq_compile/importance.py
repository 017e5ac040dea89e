"""Layer importance: how much each decoder layer changes what the model is about to say.

Three metrics, all fed by ONE layer-at-a-time calibration pass (see layerwise.py):

- jaccard (LSAQ, the paper's method): for the LAST token of each window, project the hidden
  state entering and leaving layer i onto the vocabulary (times the transposed embedding matrix;
  with final_norm=True the model's final RMSNorm is applied first, logit-lens style), take the
  top-k token ids of each, and score 1 - mean Jaccard(A, B) = 1 - mean |A n B| / |A u B|.
  A layer that leaves the top-k unchanged scores 0.
- cosine (LWQ's input-modification metric, ShortGPT's Block Influence): 1 - cosine(input,
  output) of the layer, averaged over every position of every window.
- zscore (LWQ's z-score distribution): the share of the layer's seven linear weights with
  |z| > 1 within their own matrix (z = (w - mean) / std, population std), pooled over the
  matrices so each counts by its size. Needs no calibration.

Higher = more important. `order` lists layers least important first: the layers the planner
quantizes hardest.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from lsaq_runtime.format import METRICS  # the manifest records the metric: the runtime owns the names

from .errors import LsaqError
from .layerwise import as_tensor, forward_layers
from .model_source import LINEAR_NAMES, ModelSource


class Metric:
    """Accumulates one importance value per layer from the shared pass."""

    name = ""
    needs_calibration = True

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def params(self) -> dict:
        return {}

    def update_weights(self, i: int, tensors: dict[str, np.ndarray]) -> None:
        """Layer i's weights (called once per layer, before its forward pass)."""

    def update(self, i: int, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        """A mini-batch [batch, seq, hidden] of hidden states entering and leaving layer i."""

    def result(self) -> list[float]:
        raise NotImplementedError


class Jaccard(Metric):
    name = "jaccard"

    def __init__(self, num_layers: int, embedding: np.ndarray, k: int = 10,
                 norm_weight: np.ndarray | None = None, eps: float = 1e-6,
                 embed_scale: float | None = None):
        """norm_weight: the factor the model's final RMSNorm multiplies by (Gemma's 1 + w).
        embed_scale: the model's embedding scale (Gemma's sqrt(hidden)): the projection is the
        family's own embedding, E * scale. A positive scale leaves the top-k as it is; it is
        applied so the logit-lens values are the model's."""
        super().__init__(num_layers)
        if not 1 <= k <= embedding.shape[0]:
            raise LsaqError(f"jaccard top-k must be between 1 and the vocabulary size "
                            f"{embedding.shape[0]} (got {k})")
        self.k = k
        self.unembed_t = as_tensor(embedding).T  # [hidden, vocab], a view
        self.norm_weight = None if norm_weight is None else as_tensor(norm_weight)
        self.eps = eps
        self.embed_scale = embed_scale
        self.sums = [0.0] * num_layers
        self.counts = [0] * num_layers

    def params(self):
        return {"k": self.k, "final_norm": self.norm_weight is not None, "position": "last",
                "projection": "embedding"}

    def _top_k(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_weight is not None:  # same arithmetic as the model's RMSNorm
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight
        logits = x @ self.unembed_t
        if self.embed_scale is not None:
            logits = logits * self.embed_scale
        return torch.topk(logits, self.k, dim=-1).indices

    def update(self, i, h_in, h_out):
        a, b = self._top_k(h_in[:, -1]), self._top_k(h_out[:, -1])
        inter = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1).double()  # top-k ids are distinct
        jac = inter / (2 * self.k - inter)
        self.sums[i] += float(jac.sum())
        self.counts[i] += len(jac)

    def result(self):
        return [1.0 - s / c for s, c in zip(self.sums, self.counts)]


class Cosine(Metric):
    name = "cosine"

    def __init__(self, num_layers: int):
        super().__init__(num_layers)
        self.sums = [0.0] * num_layers
        self.counts = [0] * num_layers

    def params(self):
        return {"positions": "all"}

    def update(self, i, h_in, h_out):
        # float64: an unchanged layer must score 0, not float32 rounding noise.
        cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
        self.sums[i] += float(cos.sum())
        self.counts[i] += cos.numel()

    def result(self):
        return [1.0 - s / c for s, c in zip(self.sums, self.counts)]


class ZScore(Metric):
    name = "zscore"
    needs_calibration = False

    def __init__(self, num_layers: int, threshold: float = 1.0):
        super().__init__(num_layers)
        self.threshold = threshold
        self.shares = [math.nan] * num_layers

    def params(self):
        return {"threshold": self.threshold, "weights": [f"{n}.weight" for n in LINEAR_NAMES]}

    def update_weights(self, i, tensors):
        outliers = total = 0
        for n in LINEAR_NAMES:
            w = tensors[f"{n}.weight"]
            mean, std = w.mean(dtype=np.float64), w.std(dtype=np.float64)
            if std > 0:  # a constant matrix has no outliers
                outliers += int(np.count_nonzero(np.abs(w - mean) > self.threshold * std))
            total += w.size
        self.shares[i] = outliers / total

    def result(self):
        return list(self.shares)


@dataclass
class Scores:
    metric: str
    params: dict
    calibration: dict | None  # source, sha256, samples, seq_len; None when not calibrated
    model: dict               # name, architecture, num_layers, fingerprint
    importance: list[float]
    order: list[int] = field(default_factory=list)  # least important first

    def __post_init__(self):
        if not self.order:
            self.order = rank(self.importance)

    def to_json(self) -> dict:
        return {"metric": self.metric, "params": self.params, "calibration": self.calibration,
                "model": self.model, "importance": list(self.importance), "order": list(self.order)}

    @classmethod
    def from_json(cls, d: dict | str) -> "Scores":
        """Scores from their JSON form; LsaqError saying what is wrong otherwise."""
        if isinstance(d, str):
            d = json.loads(d)
        if not isinstance(d, dict):
            raise LsaqError("scores must be a JSON object")
        missing = [k for k in ("metric", "importance", "order") if k not in d]
        if missing:
            raise LsaqError(f"scores lack {', '.join(missing)}")
        if d["metric"] not in METRICS:
            raise LsaqError(f"unknown metric {d['metric']!r}; expected one of {', '.join(METRICS)}")
        for k, typ in (("params", dict), ("calibration", (dict, type(None))), ("model", dict)):
            if not isinstance(d.get(k, {}), typ):
                raise LsaqError(f"scores: {k} must be an object")
        imp, order = d["importance"], d["order"]
        if not (isinstance(imp, list) and imp and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in imp)):
            raise LsaqError("scores: importance must be a non-empty list of finite numbers")
        if not (isinstance(order, list) and all(isinstance(x, int) and not isinstance(x, bool)
                                                 for x in order)):
            raise LsaqError("scores: order must be a list of layer indices")
        s = cls(metric=d["metric"], params=d.get("params", {}), calibration=d.get("calibration"),
                model=d.get("model", {}), importance=[float(x) for x in imp], order=list(order))
        L = len(s.importance)
        if sorted(s.order) != list(range(L)) or s.model.get("num_layers", L) != L:
            raise LsaqError(f"scores for {s.model.get('name')!r}: importance has {L} layers but "
                            f"order/num_layers disagree; score the model again")
        return s


def rank(importance: list[float]) -> list[int]:
    """Layer indices, least important first; ties go to the lower layer index."""
    return sorted(range(len(importance)), key=lambda i: (importance[i], i))


def score_model(source: ModelSource, metrics=("jaccard",), k: int = 10, final_norm: bool = False,
                calibration=None, batch_size: int = 8, progress=None) -> dict[str, Scores]:
    """Score every decoder layer with each metric in `metrics`, from a single pass.

    calibration: a `calibration.Calibration`; None loads the built-in text with the model's
    tokenizer (only when a metric needs it). progress(i, num_layers, seconds) is called per layer.
    """
    metrics = tuple(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise LsaqError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(METRICS)}")
    L = source.spec.num_layers
    accs: list[Metric] = []
    for m in metrics:
        if m == "jaccard":
            spec = source.spec
            # the family's own final norm: Gemma's multiplies by (1 + w)
            norm = (source.tensor("model.norm.weight") + np.float32(spec.family.norm_offset)
                    if final_norm else None)
            accs.append(Jaccard(L, source.embedding(), k=k, norm_weight=norm,
                                eps=spec.rms_norm_eps, embed_scale=spec.embed_scale))
        elif m == "cosine":
            accs.append(Cosine(L))
        else:
            accs.append(ZScore(L))

    def on_weights(i, tensors):
        for a in accs:
            a.update_weights(i, tensors)

    def on_hidden(i, h_in, h_out):
        for a in accs:
            a.update(i, h_in, h_out)

    calibrated = any(a.needs_calibration for a in accs)
    if calibrated:
        if calibration is None:
            from .calibration import load_calibration, load_tokenizer
            calibration = load_calibration(None, load_tokenizer(source))
        forward_layers(source, calibration.windows, on_hidden=on_hidden, on_weights=on_weights,
                       batch_size=batch_size, progress=progress)
    else:  # weights only: no forward pass
        for i in range(L):
            t0 = time.perf_counter()
            on_weights(i, source.layer_tensors(i))
            if progress:
                progress(i, L, time.perf_counter() - t0)

    model = {"name": source.spec.name, "architecture": source.spec.architecture,
             "num_layers": L, "fingerprint": source.fingerprint()}
    calib = None if calibration is None or not calibrated else {
        "source": calibration.source, "sha256": calibration.sha256,
        "samples": calibration.samples, "seq_len": calibration.seq_len}
    out = {}
    for a in accs:
        importance = a.result()
        bad = [i for i, v in enumerate(importance) if not math.isfinite(v)]
        if bad:
            raise LsaqError(f"{a.name}: non-finite importance for layers {bad}; the hidden states "
                            "overflowed or the weights hold NaN/inf — check the model files")
        out[a.name] = Scores(metric=a.name, params=a.params(),
                             calibration=calib if a.needs_calibration else None, model=model,
                             importance=importance)
    return out
