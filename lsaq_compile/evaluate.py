"""Stage 6: quality of the shipped artifacts — perplexity and multiple-choice log-likelihoods.

Every number comes from running a variant's ONNX graph in ONNX Runtime (the bytes that ship);
`torch_logits_fn` gives the same plan's dequantized weights in transformers, for cross-checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from lsaq_runtime.format import EVALUATIONS

from .errors import LsaqError

LogitsFn = Callable[[np.ndarray], np.ndarray]   # int64 ids [S] -> float32 logits [S, vocab]


# ---------------------------------------------------------------- running a bundle's graph
def onnx_logits_fn(bundle: Path, manifest: dict, variant: str, threads: int | None = None,
                   context: int = 1024) -> "OnnxLogits":
    """Full-sequence logits from a variant's CPU graph, run by the runtime users run: its file
    verification and graph checks, its session, IOBinding and preallocated KV buffer (one
    prefill on an empty cache per call). The KV buffer is sized for `context` tokens and the
    variant reloaded with room for a longer input when one comes. `.batch` scores many
    sequences per run (multiple choice)."""
    names = [x["name"] for x in manifest["variants"]]
    if variant not in names:
        raise LsaqError(f"no variant {variant!r} in {bundle}; have: {', '.join(names)}")
    return OnnxLogits(bundle, variant, manifest["model"]["max_context"], threads, context)


class OnnxLogits:
    def __init__(self, bundle, variant: str, cap: int, threads, context: int):
        self.bundle, self.variant, self.cap, self.threads = bundle, variant, cap, threads
        self.context, self.model = context, None

    @classmethod
    def of(cls, model) -> "OnnxLogits":
        """An already loaded runtime Model; inputs longer than its context are refused."""
        fn = cls(None, None, model.context, None, model.context)
        fn.model = model
        return fn

    def _model_for(self, n: int):
        import lsaq_runtime

        m = self.model
        if m is None or n > m.context:
            if n > self.cap:
                raise LsaqError(f"{n} tokens exceed the bundle's max_context {self.cap}")
            if m is not None:
                m.close()
            ctx = min(self.cap, max(n, self.context, 2 * m.context if m is not None else 0))
            self.model = lsaq_runtime.load(self.bundle, context=ctx, device="cpu",
                                           variant=self.variant, threads=self.threads)
        return self.model

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._model_for(len(ids)).score_tokens(ids)

    def batch(self, rows: list[list[int]], starts: list[int]) -> list[np.ndarray]:
        return self._model_for(max(map(len, rows))).score_batch(rows, starts)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None


def bundle_codec(bundle, manifest: dict | None = None):
    """The bundle's text codec (the runtime's): the one encoder for every evaluation."""
    from lsaq_runtime.manifest import load_manifest
    from lsaq_runtime.text import TextCodec

    return TextCodec(Path(bundle), manifest or load_manifest(bundle))


def encoder(codec) -> Callable[[str], list[int]]:
    """text -> token ids as the model reads a sequence (BOS first when it expects one): lm-eval
    encodes a request's context the same way. `codec`: a TextCodec or a bundle folder."""
    if isinstance(codec, (str, os.PathLike)):
        codec = bundle_codec(codec)
    return codec.encode


def torch_logits_fn(model_path, precisions: list[str], quantization: dict | None = None,
                    tables: dict[str, str] | None = None) -> LogitsFn:
    """The same plan in transformers, with exactly the dequantized weights the graph uses.
    quantization: the manifest's `quantization` record (None: the paper's per-channel RTN);
    for clip 'mse-act' its clip_calibration says which text the clipping was measured on.
    tables: the variant's token-table precisions (manifest `tables`; fp16 when left out)."""
    import torch

    from .model_source import open_model
    from .quantize import QuantSettings
    from .reference import reference_model

    settings = QuantSettings.from_manifest(quantization)
    source = open_model(model_path)
    act = (_clip_activations(source, (quantization or {}).get("clip_calibration"))
           if settings.clip == "mse-act" else None)
    model = reference_model(source, precisions, settings.schemes(), act_stats=act,
                            tables=tables).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(ids, np.int64))[None]).logits[0].float().numpy()

    return run


def _clip_activations(source, calib: dict | None) -> dict:
    """The activation statistics an 'mse-act' bundle was quantized with, measured again on the
    same calibration windows (checked by their fingerprint)."""
    from .activations import activation_stats, windows_fingerprint
    from .calibration import load_calibration, load_tokenizer

    if not calib:
        raise LsaqError("the manifest does not say which calibration text the 'mse-act' "
                        "clipping used, so its torch reference cannot be rebuilt")
    path = None if calib["source"].startswith("builtin:") else calib["source"]
    c = load_calibration(path, load_tokenizer(source), calib["samples"], calib["seq_len"])
    same = (windows_fingerprint(c.windows) == calib["windows_sha256"]
            if "windows_sha256" in calib else c.sha256 == calib["sha256"])
    if not same:
        raise LsaqError(f"{calib['source']}: cannot cut the calibration windows the bundle's "
                        "'mse-act' clipping used (fingerprint differs: another text, or windows "
                        "cut differently), so its torch reference cannot be rebuilt")
    return activation_stats(source, c.windows)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# Rows per chunk of log_softmax_rows: float64 temporaries of a few MB at any vocabulary. A whole
# window's log-probabilities are five fresh arrays of 8 x positions x vocabulary bytes (200 MB
# each for 512 positions of SmolLM2's 49k), and fresh memory is not free: on a VM that hands
# freed pages back to its host (this project's machines), first touch ran at 80-130 MB/s, so
# one window's temporaries cost seconds; the chunks' are reused while still warm.
LSM_ROWS = 32


def log_softmax_rows(x: np.ndarray, rows: int = LSM_ROWS):
    """(first row, float64 log_softmax of x[first:first + rows]) over x [positions, vocab]:
    each row's values bit for bit _log_softmax(x)'s (the reductions run along a row)."""
    for a in range(0, len(x), rows):
        yield a, _log_softmax(x[a:a + rows])


def token_logprobs(x: np.ndarray, targets) -> np.ndarray:
    """float64 [positions]: log p(targets[t]) under row t of logits x, the values
    _log_softmax(x)[arange, targets] holds, without the whole [positions, vocab] array."""
    targets = np.asarray(targets)
    if len(x) < len(targets):
        raise ValueError(f"{len(targets)} targets for {len(x)} rows of logits")
    out = np.empty(len(targets), np.float64)
    for a, lp in log_softmax_rows(x[:len(targets)]):
        out[a:a + len(lp)] = lp[np.arange(len(lp)), targets[a:a + len(lp)]]
    return out


# ---------------------------------------------------------------- perplexity
@dataclass
class TextWindows:
    source: str
    sha256: str        # of the text file
    seq_len: int
    windows: np.ndarray  # int64 [n, seq_len]
    total_tokens: int
    prefix: tuple = ()   # what starts every window ((BOS,) for a model that expects one)


def text_windows(path: str | os.PathLike, codec, seq_len: int = 1024,
                 windows: int | None = None) -> TextWindows:
    """Non-overlapping windows of the tokenized text, from its start (the usual WikiText-2
    recipe), each framed as the model frames a sequence: BOS + seq_len - 1 tokens of text for a
    model that expects BOS. `codec`: a TextCodec or a bundle folder."""
    if isinstance(codec, (str, os.PathLike)):
        codec = bundle_codec(codec)
    p = Path(path)
    try:
        raw = p.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise LsaqError(f"{p}: text file not found") from None
    except UnicodeDecodeError as e:
        raise LsaqError(f"{p}: not UTF-8 text ({e})") from None
    prefix = list(codec.prefix)
    span = seq_len - len(prefix)
    if span < 1:
        raise LsaqError(f"--seq-len {seq_len} leaves no room for text after BOS")
    ids = codec.encode_text(text)
    n_avail = len(ids) // span
    n = n_avail if windows is None else min(windows, n_avail)
    if n < 1 or (windows is not None and windows > n_avail):
        raise LsaqError(f"{p}: {len(ids)} tokens make {n_avail} windows of {seq_len}; "
                        f"asked for {windows} — use a longer text, fewer --windows or a smaller --seq-len")
    body = np.asarray(ids[: n * span], np.int64).reshape(n, span)
    arr = np.concatenate([np.tile(np.asarray(prefix, np.int64), (n, 1)), body], axis=1)
    return TextWindows(str(p), hashlib.sha256(raw).hexdigest(), seq_len, arr, len(ids),
                       tuple(prefix))


def window_nll(logits_fn: LogitsFn, window: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(token t+1 | tokens <= t) over a window, and the number of predictions."""
    target = window[1:]
    return float(-token_logprobs(logits_fn(window), target).sum()), len(target)


def perplexity(logits_fn: LogitsFn, tw: TextWindows, progress=None, limit: int | None = None) -> dict:
    nll, count = 0.0, 0
    per_window = []
    n = len(tw.windows) if limit is None else min(limit, len(tw.windows))
    t0 = time.perf_counter()
    for w in range(n):
        s, c = window_nll(logits_fn, tw.windows[w])
        nll += s
        count += c
        per_window.append(s / c)
        if progress:
            progress(f"window {w + 1}/{n}: running ppl {math.exp(nll / count):.3f} "
                     f"({time.perf_counter() - t0:.0f}s)")
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count,
            "windows": n, "per_window_nll": per_window}


# ---------------------------------------------------------------- multiple choice
@dataclass
class ChoiceItem:
    """One question: choice i is the log-likelihood of requests[i] = (context, continuation).
    Most tasks share one context; partial scoring (WinoGrande) has one context per choice and a
    shared continuation."""
    requests: list[tuple[str, str]]
    label: int
    # acc_norm divides choice i's log-likelihood by norm_lengths[i]: lm-eval uses the length in
    # characters of the choice as its task lists it (no delimiter). None: the task has no acc_norm.
    norm_lengths: list[int] | None = None

    @classmethod
    def shared(cls, context: str, choices: list[str], label: int) -> "ChoiceItem":
        """Every choice continues the same context; acc_norm divides by len(choice)."""
        return cls([(context, c) for c in choices], label, [len(c) for c in choices])


def load_choice_tasks(path: str | os.PathLike) -> list[ChoiceItem]:
    """JSONL: one {"context": str, "choices": [str, ...], "label": int} per line; each choice is
    appended to the context as it is (give it its leading space)."""
    p = Path(path)
    if not p.is_file():
        raise LsaqError(f"{p}: task file not found")
    items = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = ChoiceItem.shared(str(d["context"]), [str(c) for c in d["choices"]], int(d["label"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise LsaqError(f"{p}:{n}: expected {{\"context\", \"choices\", \"label\"}} ({e})") from None
        if not 0 <= item.label < len(item.requests):
            raise LsaqError(f"{p}:{n}: label {item.label} out of range for {len(item.requests)} choices")
        items.append(item)
    if not items:
        raise LsaqError(f"{p}: no tasks")
    return items


def split_request(encode: Callable[[str], list[int]], context: str, continuation: str
                  ) -> tuple[list[int], int]:
    """(tokens of context + continuation, number of context tokens), split as
    lm-evaluation-harness does: encode the whole, the continuation is what follows the
    context's own token count (a trailing space of the context moves to the continuation)."""
    if context.endswith(" "):
        n = len(context) - len(context.rstrip(" "))
        context, continuation = context[:-n], context[-n:] + continuation
    whole = encode(context + continuation)
    n_ctx = len(encode(context))
    if n_ctx == 0:
        raise LsaqError("empty context: multiple-choice scoring needs at least one context token")
    if n_ctx >= len(whole):
        raise LsaqError(f"the continuation {continuation!r} adds no tokens to its context")
    return whole, n_ctx


def continuation_loglikelihood(logits_fn: LogitsFn, encode: Callable[[str], list[int]],
                               context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation tokens | context) (split_request), and whether it is the
    greedy output."""
    return loglikelihoods(logits_fn, [split_request(encode, context, continuation)])[0]


def shared_rows(requests: list[tuple[list[int], int]]):
    """(each request's input, the rows to run sorted by length, input -> covering row,
    row -> first position any of its requests needs): equal inputs, and inputs that are a
    prefix of another, share the longer one's row."""
    inputs = [tuple(whole[:-1]) for whole, _ in requests]
    order = sorted(set(inputs))
    # a row that is a prefix of the next in sorted order is covered by it (and transitively on)
    cover = {}
    for j in range(len(order) - 1, -1, -1):
        nxt = order[j + 1] if j + 1 < len(order) else None
        cover[order[j]] = cover[nxt] if nxt is not None and nxt[:len(order[j])] == order[j] \
            else order[j]
    rows = sorted({cover[x] for x in inputs}, key=len)
    first: dict[tuple, int] = {}
    for (whole, n_ctx), x in zip(requests, inputs):
        r = cover[x]
        first[r] = min(first.get(r, n_ctx - 1), n_ctx - 1)
    return inputs, rows, cover, first


def loglikelihoods(logits_fn, requests: list[tuple[list[int], int]], max_tokens: int = 2048,
                   progress=None) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy?) of each (tokens, n_ctx) request: the sum of log p(token t |
    tokens < t) for t >= n_ctx.

    The model reads tokens[:-1]. Requests whose inputs are equal, or a prefix of another's
    (one-token answers such as BoolQ's yes/no read the same input), share one row: attention is
    causal, so the longer row's logits at those positions are the same. With `logits_fn.batch`
    rows are scored many per run (sorted by length, at most `max_tokens` padded tokens a run);
    otherwise one call per row."""
    inputs, rows, cover, first = shared_rows(requests)
    users: dict[tuple, list[int]] = {}   # row -> the requests it answers
    for k, x in enumerate(inputs):
        users.setdefault(cover[x], []).append(k)
    results: list = [None] * len(requests)

    def score(r: tuple, logits: np.ndarray) -> None:
        # logits from position first[r] on; reduced to each request's numbers at once, so
        # memory holds one run's logits, not every row's (4 bytes x vocab per position)
        for k in users[r]:
            whole, n_ctx = requests[k]
            lo = n_ctx - 1 - first[r]
            z = logits[lo: lo + len(whole) - n_ctx]
            cont = np.asarray(whole[n_ctx:])
            # greedy from the logits: log_softmax keeps each row's order, ties included
            results[k] = (float(token_logprobs(z, cont).sum()),
                          bool(np.all(z.argmax(axis=-1) == cont)))

    batch = getattr(logits_fn, "batch", None)
    i = 0
    while i < len(rows):
        if batch is None:
            r = rows[i]
            score(r, logits_fn(np.asarray(r, np.int64))[first[r]:])
            i += 1
        else:
            # grow the run while its padded tokens, and the logits rows it returns (4 bytes x
            # vocab each), stay within max_tokens
            j, low = i + 1, first[rows[i]]
            while j < len(rows):
                n, low2 = j + 1 - i, min(low, first[rows[j]])
                if n * len(rows[j]) > max_tokens or n * (len(rows[j]) - low2) > max_tokens // 4:
                    break
                j, low = j + 1, low2
            group = rows[i:j]
            for r, out in zip(group, batch([list(r) for r in group], [first[r] for r in group])):
                score(r, out)
            i = j
        if progress:
            progress(f"{i}/{len(rows)} sequences")
    return results


def multiple_choice(logits_fn: LogitsFn, encode, items: Iterable[ChoiceItem], progress=None) -> dict:
    """acc: argmax of summed log-likelihood; acc_norm: of log-likelihood / norm length (lm-eval),
    for items that have one. Each metric comes with lm-eval's standard error (sample std /
    sqrt(n)); `correct` keeps the per-item outcomes for paired comparisons. All items' requests
    are scored together (see loglikelihoods)."""
    items = list(items)
    requests = [split_request(encode, ctx, cont) for it in items for ctx, cont in it.requests]
    flat = [ll for ll, _ in loglikelihoods(logits_fn, requests, progress=progress)]
    correct, correct_norm, details = [], [], []
    pos = 0
    for it in items:
        lls = flat[pos: pos + len(it.requests)]
        pos += len(it.requests)
        correct.append(int(np.argmax(lls) == it.label))
        if it.norm_lengths is not None:
            correct_norm.append(int(np.argmax(np.asarray(lls) / np.asarray(it.norm_lengths, float)) == it.label))
        details.append({"loglikelihoods": lls, "label": it.label})
    labels = [it.label for it in items]
    out = {"items": len(items), "acc": float(np.mean(correct)), "acc_stderr": mean_stderr(correct),
           "correct": correct, "details": details,
           # what guessing scores on these questions: uniformly, or always the commonest answer
           "chance": float(np.mean([1 / len(it.requests) for it in items])),
           "majority": max(map(labels.count, set(labels))) / len(items)}
    if correct_norm:
        if len(correct_norm) != len(items):
            raise LsaqError("acc_norm needs every item's choice lengths, or none")
        out.update(acc_norm=float(np.mean(correct_norm)), acc_norm_stderr=mean_stderr(correct_norm),
                   correct_norm=correct_norm)
    return out


def mean_stderr(xs) -> float:
    """lm-eval's standard error of a mean: sample standard deviation (n - 1) / sqrt(n)."""
    x = np.asarray(xs, np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


# ---------------------------------------------------------------- results in the bundle
# Results live beside the manifest, never in it: manifest.json does not change after the build
# (its bytes are what a server pins and a verifier hashes).
EVALUATIONS_FORMAT = "lsaq-evaluations"


def _manifest_sha256(bundle: Path) -> str:
    from lsaq_runtime.format import MANIFEST

    return hashlib.sha256((Path(bundle) / MANIFEST).read_bytes()).hexdigest()


def read_evaluations(bundle, manifest: dict | None = None) -> list[dict]:
    """The results recorded for this bundle: evaluations.json beside its manifest (when it was
    written for this very manifest), else the `evaluations` an older bundle kept inside its
    manifest."""
    from lsaq_runtime.manifest import read_manifest_json

    root = Path(bundle)
    legacy = list((manifest if manifest is not None else read_manifest_json(root))
                  .get("evaluations", []))
    path = root / EVALUATIONS
    if not path.is_file():
        return legacy
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        entries = rec["evaluations"]
        if rec.get("format") != EVALUATIONS_FORMAT or not (
                isinstance(entries, list) and all(isinstance(e, dict) and "kind" in e
                                                  and "variant" in e for e in entries)):
            raise ValueError("not the format `lsaq-compile eval` writes")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise LsaqError(f"{path}: cannot be read as recorded results "
                        f"({getattr(e, 'strerror', None) or e}); delete it to measure again") from None
    if rec.get("manifest_sha256") != _manifest_sha256(root):
        return legacy   # results of another build of this folder: not this bundle's
    return entries


def record_evaluations(bundle: Path, entries: list[dict]) -> None:
    """Add results to the bundle's evaluations.json (replacing those of the same kind, variant,
    text and settings), written atomically; manifest.json is left as the build wrote it."""
    root = Path(bundle)
    key = lambda e: (e["kind"], e["variant"], e["provider"], e.get("data_sha256"),
                     json.dumps(e.get("settings", {}), sort_keys=True))
    new = {key(e) for e in entries}
    kept = [e for e in read_evaluations(root) if key(e) not in new]
    rec = {"format": EVALUATIONS_FORMAT, "manifest_sha256": _manifest_sha256(root),
           "evaluations": kept + list(entries)}
    path = root / EVALUATIONS
    tmp = path.with_name(f".{EVALUATIONS}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rec, indent=1))
    os.replace(tmp, path)


def file_sha256(path) -> str:
    from lsaq_runtime.integrity import sha256_file

    return sha256_file(path)
