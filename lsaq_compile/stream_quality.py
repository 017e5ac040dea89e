"""Build-time quality without the graphs: every variant's perplexity and KL from FP16 on the
held-out windows, computed by torch with one decoder layer in memory at a time.

The graph engine (stages/writer.measure_quality) runs each variant's CPU graph, a float32 graph
of 4 bytes a parameter: a 7B model's does not fit a 24 GiB machine. Here the same numbers come
from a streamed pass in the style of estimate.plans_kl: the FP16 state and each variant's are
carried layer by layer (variants alike up to a layer share one state up to there: at most
1 + variants forward passes), and the head is applied by vocabulary row chunks.

Every matrix a variant computes with is read from the bundle's weight store, dequantized: the
decoder linears (stored fused, qkv and gate_up, split back into transformers' modules by rows),
the embedding rows of the windows and the LM head at the precision the variant's CPU graph reads
(its `providers.cpu.lm_head`). The quality numbers are those of the shipped weights, never of a
quantization made again from the source. The source gives what the store holds as the model
holds it anyway: the layer's norms, biases and RoPE (through transformers' layer classes).
Compute is float32, as the CPU graphs'; their MatMulNBits kernels quantize activations to int8
(accuracy level 4), so quantized variants differ from the graphs' numbers by that much.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from lsaq_runtime.format import MEMBERS, STORED_LINEARS, layer_key, linear_base, split_precision

from .bundle_reader import BundleReader, Quantized, StoredWeight, linear_dims
from .devices import _device, to_float32
from .errors import LsaqError
from .quantize import dequantize_blocks
from .estimate import HEAD_CHUNK, _Clock, _scale_embedded, _Stack, head_sums
from .layerwise import final_norm

TOKEN_BLOCK = 2048     # predicted positions projected on the vocabulary at once


def streamed_quality(root: Path, windows: np.ndarray, source, log, *, device: str = "cpu",
                     batch_size: int = 4) -> dict[str, dict]:
    """{variant: {"perplexity", "tokens", "kl_fp16"}} of every variant of the bundle at `root`
    (manifest.json written, quality not yet), as measure_quality returns them: windows[w, 1:]
    predicted from positions [:-1], KL(FP16 || variant) per predicted token."""
    # The manifest was written by this build from the files it just hashed: verifying would
    # hash the whole store again (minutes at 7B) to learn nothing.
    reader = BundleReader.open(root, verify=False)
    variants = sorted(reader.manifest["variants"], key=lambda v: v["name"] != "fp16")
    if variants[0]["name"] != "fp16":
        raise LsaqError("quality ranking needs the fp16 variant as the reference")
    st = _Stack(source, windows, _device(device), torch.float32)
    items = [_item(reader, v) for v in variants]
    t0 = time.perf_counter()
    states = _forward(reader, st, items, batch_size, log)
    log(f"layers done in {time.perf_counter() - t0:.0f}s; the head over "
        f"{st.vocab} vocabulary rows, {len({i['head'].base for i in items})} head tables")
    got = _at_head(reader, st, states, items)
    out = {}
    for it, (nll, kl) in zip(items, got):
        out[it["name"]] = {"perplexity": round(math.exp(nll / st.tokens), 4),
                           "tokens": st.tokens, "kl_fp16": round(kl / st.tokens, 6)}
        log(f"{it['name']}: KL from FP16 {kl / st.tokens:.5f}, perplexity "
            f"{math.exp(nll / st.tokens):.3f} on {st.n} held-out windows "
            f"({time.perf_counter() - t0:.0f}s)")
    return out


def _item(reader: BundleReader, v: dict) -> dict:
    """What one variant computes with: its layer precisions and its stored token tables (the
    head its CPU graph reads; a tied head at the table's precision is the embedding itself)."""
    cpu = (v.get("providers") or {}).get("cpu")
    if cpu is None:
        raise LsaqError(f"variant {v['name']} has no CPU graph: build quality is measured on "
                        "the CPU graphs' weights")
    ws = reader.variant_weights(v, head=cpu.get("lm_head", "fp16"))
    emb = next(w for w in ws if w.role == "embedding")
    head = next((w for w in ws if w.role == "lm_head"), emb)
    return {"name": v["name"], "precisions": tuple(v["precisions"]), "embed": emb, "head": head}


# ---------------------------------------------------------------------------- the layers
def _forward(reader: BundleReader, st: _Stack, items: list[dict], batch_size: int, log) -> dict:
    """The state leaving the last layer of every distinct variant prefix, keyed
    (embedding base, precisions): float32 [n, seq, hidden]."""
    L = st.spec.num_layers
    batches = [slice(b, min(st.n, b + batch_size)) for b in range(0, st.n, batch_size)]
    embs = {it["embed"].base: it["embed"] for it in items}
    states = {(b, ()): _embedded(reader, st, w).to(st.device) for b, w in embs.items()}
    rows = _member_rows(reader.model)
    clock = _Clock(L, 0, lambda step: log(str(step)), st.device)
    t0 = time.perf_counter()
    # the source's linears are not read: _set_weights gives every module the store's before
    # each run (placeholders, never written or read: untouched memory costs nothing)
    dims = linear_dims(reader.model)
    blank = {m: torch.empty(b - a, dims[lin][1], dtype=st.dtype) for m, (lin, a, b) in rows.items()}
    for i in range(L):
        layer = st.layer(i, linears=blank)
        need = sorted({(it["embed"].base, it["precisions"][:i + 1]) for it in items},
                      key=lambda k: k[1][-1])         # alike precisions together
        new, cache = {}, {}
        with torch.no_grad():
            for key in need:
                parts = split_precision(key[1][-1])
                _set_weights(reader, st, layer, i, parts, rows, cache)
                h = states[(key[0], key[1][:-1])]
                new[key] = torch.cat([st.run(layer, i, h[sl]) for sl in batches])
        states = new
        del layer, cache
        clock.tick("streamed", i + 1, t0)
    return states


def _member_rows(model: dict) -> dict[str, tuple[str, int, int]]:
    """HF linear (q_proj, ...) -> (the stored linear holding it, its rows [a, b) there)."""
    h = model["head_dim"]
    size = {"self_attn.q_proj": model["num_attention_heads"] * h,
            "self_attn.k_proj": model["num_key_value_heads"] * h,
            "self_attn.v_proj": model["num_key_value_heads"] * h,
            "self_attn.o_proj": model["hidden_size"],
            "mlp.gate_proj": model["intermediate_size"], "mlp.up_proj": model["intermediate_size"],
            "mlp.down_proj": model["hidden_size"]}
    out = {}
    for lin, members in MEMBERS.items():
        a = 0
        for m in members:
            out[m] = (lin, a, a + size[m])
            a += size[m]
    return out


def _set_weights(reader: BundleReader, st: _Stack, layer, i: int, parts: dict[str, str],
                 rows: dict, cache: dict) -> None:
    """Give each linear module of `layer` its stored weight at the part's precision: views of
    the layer's dequantized stored linears, each made once per layer whatever the number of
    variants asking (a 7B layer's three precisions: 2.4 GB; evicting by precision made them
    again at every switch, and copying every module's weight per variant was most of a
    variant's time)."""
    from lsaq_runtime.format import LINEAR_PART

    for k in {(lin, parts[LINEAR_PART[lin]]) for lin in STORED_LINEARS} - set(cache):
        cache[k] = _stored_linear(reader, i, *k).to(st.device, st.dtype)
    for mod, members in st.modules.items():
        w = []
        for m in members:
            lin, a, b = rows[m]
            w.append(cache[(lin, parts[LINEAR_PART[lin]])][a:b])   # rows: a contiguous view
        layer.get_submodule(mod).weight.data = w[0] if len(w) == 1 else torch.cat(w)


def _stored_linear(reader: BundleReader, i: int, lin: str, precision: str) -> torch.Tensor:
    """float32 [N, K]: stored linear `lin` of layer i at `precision`, as the kernels read it."""
    w = StoredWeight(layer_key(i, f"{lin}.weight"), linear_base(i, lin, precision), precision,
                     linear_dims(reader.model)[lin])
    if precision in ("fp16", "fp32"):
        return torch.from_numpy(to_float32(reader.float_weight(w)))
    return _dequantized(reader.quantized(w))


def _dequantized(q: Quantized) -> torch.Tensor:
    """Quantized.dequantize in torch, bit-identical ((code - zero point) is an exact small
    integer, times the fp16 scale one rounding) and multi-threaded."""
    codes = torch.from_numpy(q.codes).reshape(q.n, q.scales.shape[1], -1)
    return dequantize_blocks(codes, torch.from_numpy(q.zero_points), q.scales, q.k).contiguous()


# ---------------------------------------------------------------------------- the tables
def _table(reader: BundleReader, w: StoredWeight):
    """A stored token table, held as stored (float16, or codes and scales)."""
    return reader.float_weight(w) if w.precision in ("fp16", "fp32") else reader.quantized(w)


def _table_rows(t, rows) -> np.ndarray:
    """float32 rows (a slice or an index array) of a stored table, dequantized alone (tables
    are quantized per row)."""
    if isinstance(t, Quantized):
        codes = t.codes[rows]
        return Quantized(t.scheme, len(codes), t.k, codes, t.scales[rows],
                         t.zero_points[rows]).dequantize()
    return t[rows].astype(np.float32)


def _embedded(reader: BundleReader, st: _Stack, w: StoredWeight) -> torch.Tensor:
    """float32 [n, seq, hidden]: the stored embedding rows of the windows' tokens."""
    t = _table(reader, w)
    ids = st.ids.reshape(-1)
    if int(ids.max()) >= w.shape[0]:
        raise LsaqError(f"held-out token id {int(ids.max())} is outside the model's "
                        f"{w.shape[0]}-row embedding")
    uniq, inv = np.unique(ids, return_inverse=True)
    sub = _table_rows(t, uniq)
    rows = torch.from_numpy(np.ascontiguousarray(sub[inv]).reshape(*st.ids.shape, -1))
    return _scale_embedded(st.spec, rows)


# ---------------------------------------------------------------------------- the head
def _at_head(reader: BundleReader, st: _Stack, states: dict, items: list[dict]
             ) -> list[tuple[float, float]]:
    """(summed NLL of the targets, summed KL from items[0]) of every item, by blocks of
    predicted positions and vocabulary row chunks of each distinct head table. Variants with
    one final state and one head (a pair) are computed once."""
    T = st.seq_len - 1
    pairs = [((it["embed"].base, it["precisions"]), it["head"].base) for it in items]
    distinct = list(dict.fromkeys(pairs))
    normed = {k: final_norm(st.spec, states[k][:, :-1].float(), st.norm.float())
              .reshape(-1, st.spec.hidden_size) for k in {k for k, _ in distinct}}
    targets = torch.from_numpy(st.ids[:, 1:].reshape(-1)).to(st.device)
    tables = {it["head"].base: _table(reader, it["head"]) for it in items}
    nll, kl = dict.fromkeys(distinct, 0.0), dict.fromkeys(distinct, 0.0)
    for a in range(0, st.n * T, TOKEN_BLOCK):
        blk = slice(a, min(st.n * T, a + TOKEN_BLOCK))
        x = {k: v[blk] for k, v in normed.items()}
        walk = _walk(st, tables)
        lse, kls, zt = head_sums(st, x, distinct, pairs[0], walk, targets[blk])
        for pr in distinct:
            nll[pr] += float((lse[pr] - zt[pr]).sum())
            kl[pr] += kls[pr]
    return [(nll[pr], kl[pr]) for pr in pairs]


def _walk(st: _Stack, tables: dict):
    """(first row, {head: float32 rows}) per vocabulary chunk, every head table at once."""
    for a in range(0, st.vocab, HEAD_CHUNK):
        b = min(st.vocab, a + HEAD_CHUNK)
        yield a, {base: torch.from_numpy(_table_rows(t, slice(a, b))).to(st.device)
                  for base, t in tables.items()}
