"""Layer importance: the layer-at-a-time pass, the three metrics, Scores JSON and the plot."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lsaq_compile.calibration import Calibration
from lsaq_compile.errors import LsaqError
from lsaq_compile.importance import Jaccard, Scores, ZScore, rank, score_model
from lsaq_compile.layerwise import forward_layers
from lsaq_compile.model_source import LINEAR_NAMES, open_model
from factories.data import C4
from factories.models import TINY_FAMILIES, make_tiny_family, make_tiny_model

VOCAB = 300
IDENTITY = 2  # the layer turned into an identity


def _calib(vocab=VOCAB, samples=6, seq_len=32, seed=0) -> Calibration:
    ids = np.random.default_rng(seed).integers(3, vocab, (samples, seq_len), dtype=np.int64)
    return Calibration(windows=ids, source="random", sha256="0" * 64, samples=samples,
                       seq_len=seq_len)


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory) -> Path:
    """Tiny Llama whose layer IDENTITY writes nothing to the residual stream."""
    from safetensors.numpy import load_file, save_file

    d = make_tiny_model(tmp_path_factory.mktemp("ident") / "m", vocab_size=VOCAB)
    f = d / "model.safetensors"
    t = load_file(f)
    for name in ("self_attn.o_proj", "mlp.down_proj"):
        t[f"model.layers.{IDENTITY}.{name}.weight"][:] = 0
    save_file(t, f, metadata={"format": "pt"})
    return d


def test_identity_layer_scores_zero_and_ranks_first(identity_model):
    src = open_model(identity_model)
    calls = []
    res = score_model(src, metrics=("jaccard", "cosine", "zscore"), k=10, calibration=_calib(),
                      batch_size=4, progress=lambda i, n, s: calls.append((i, n)))
    assert calls == [(i, 4) for i in range(4)]
    for m in ("jaccard", "cosine"):
        imp = res[m].importance
        assert imp[IDENTITY] <= 1e-6, (m, imp)
        assert res[m].order[0] == IDENTITY, (m, res[m].order)
        # The other layers really move the top-k / the direction, so the test is not vacuous.
        assert all(v > 0.02 for i, v in enumerate(imp) if i != IDENTITY), (m, imp)
    assert res["jaccard"].calibration == {"source": "random", "sha256": "0" * 64, "samples": 6,
                                          "seq_len": 32}
    assert res["zscore"].calibration is None
    # The same metrics scored alone give the same numbers as the shared pass.
    alone = score_model(src, metrics=("cosine",), calibration=_calib())["cosine"]
    assert alone.importance == pytest.approx(res["cosine"].importance, abs=1e-12)


def _reference_scores(hf_model, windows, k, final_norm):
    """Jaccard and cosine straight from a full-model forward with output_hidden_states."""
    last = {}
    # (transformers 4's Gemma 3 layers return a tuple)
    hook = hf_model.model.layers[-1].register_forward_hook(
        lambda m, a, out: last.update(out=out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        hs = list(hf_model(torch.from_numpy(windows), output_hidden_states=True).hidden_states)
        hook.remove()
        # transformers hands back the last layer's output after the final norm; take it raw.
        L = len(hf_model.model.layers)
        hs[L] = last["out"]
        E = hf_model.model.embed_tokens.weight
        norm = hf_model.model.norm
        top_k = lambda h: ((norm(h[:, -1]) if final_norm else h[:, -1]) @ E.T).topk(k).indices
        jac, cos = [], []
        for i in range(L):
            a, b = hs[i], hs[i + 1]
            ta, tb = top_k(a).tolist(), top_k(b).tolist()
            jac.append(1 - np.mean([len(set(x) & set(y)) / len(set(x) | set(y))
                                    for x, y in zip(ta, tb)]))
            cos.append(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean().item())
    return hs, jac, cos


@pytest.mark.parametrize("arch", list(TINY_FAMILIES))
def test_layerwise_matches_full_forward(tmp_path, arch):
    """Every family: windows of 24 tokens pass sliding windows (mistral, phi3, gemma3), the
    original lengths of longrope (phi3) and dynamic NTK (llama_dynamic); the final-norm option
    uses the family's own norm (Gemma's 1 + w, its weights randomised so it matters)."""
    from transformers import AutoModelForCausalLM

    d = make_tiny_family(tmp_path / arch, arch, vocab_size=VOCAB)
    src = open_model(d)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cal = _calib(samples=5, seq_len=24, seed=1)
    hs, ref_jac, ref_cos = _reference_scores(hf, cal.windows, k=8, final_norm=True)

    got = {}
    forward_layers(src, cal.windows, batch_size=2,  # 5 samples: batches of 2, 2 and 1
                   on_hidden=lambda i, a, b: got.setdefault(i, []).append((a.clone(), b.clone())))
    for i in range(src.spec.num_layers):
        h_in = torch.cat([a for a, _ in got[i]])
        h_out = torch.cat([b for _, b in got[i]])
        torch.testing.assert_close(h_in, hs[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h_out, hs[i + 1], atol=1e-4, rtol=1e-4)

    res = score_model(src, metrics=("jaccard", "cosine"), k=8, final_norm=True, calibration=cal)
    assert res["jaccard"].importance == pytest.approx(ref_jac, abs=1e-6)
    assert res["cosine"].importance == pytest.approx(ref_cos, abs=1e-4)
    assert res["jaccard"].params["final_norm"] is True and res["jaccard"].params["k"] == 8


def test_layerwise_reads_the_embedding_by_row_ranges(tmp_path, monkeypatch):
    """The windows' embedding rows are read by row ranges (Llama 3's table read whole was
    2.1 GB of float32 for a few hundred rows): the same states, bit for bit, as from the whole
    table, which is never read; a token past the table is refused in one line."""
    from lsaq_compile.model_source import EMBED

    src = open_model(make_tiny_family(tmp_path / "g", "gemma3", vocab_size=VOCAB))  # scaled
    cal = _calib(samples=3, seq_len=16, seed=2)
    monkeypatch.setattr(type(src), "ROW_RANGE", 100)  # several ranges, most without a token

    def states():
        got = []
        forward_layers(src, cal.windows, on_output=lambda i, h: got.append(h.clone()))
        return got

    real = src.tensor
    monkeypatch.setattr(src, "tensor", lambda n: pytest.fail("read whole") if n == EMBED else real(n))
    by_rows = states()
    monkeypatch.setattr(src, "tensor", real)
    monkeypatch.setattr(src, "tensor_rows", lambda name, a, b: None)
    whole = states()
    assert len(by_rows) == src.spec.num_layers
    assert all(torch.equal(a, b) for a, b in zip(by_rows, whole))
    monkeypatch.undo()
    bad = cal.windows.copy()
    bad[0, 3] = VOCAB
    with pytest.raises(LsaqError, match=f"token id {VOCAB} is outside the model's {VOCAB}-row"):
        forward_layers(src, bad)


def test_final_norm_changes_projection_not_identity(identity_model):
    src = open_model(identity_model)
    plain = score_model(src, calibration=_calib(), k=5)["jaccard"]
    normed = score_model(src, calibration=_calib(), k=5, final_norm=True)["jaccard"]
    assert plain.params["final_norm"] is False and normed.params["final_norm"] is True
    assert plain.importance[IDENTITY] == normed.importance[IDENTITY] == 0.0


def test_zscore_known_answer():
    z = ZScore(num_layers=1)
    tensors = {f"{n}.weight": np.zeros((3, 5), np.float32) for n in LINEAR_NAMES}  # constant: 0
    # mean 0, std sqrt(2): only -2 and 2 have |z| > 1.
    tensors["self_attn.q_proj.weight"] = np.array([[-2, -1, 0, 1, 2]], np.float32)
    # mean 2.5, std sqrt(18.75) ~ 4.33: only 10 (|z| ~ 1.73) is past 1.
    tensors["mlp.down_proj.weight"] = np.array([[0, 0, 0, 10]], np.float32)
    z.update_weights(0, tensors)
    # Pooled by size: (2 + 1) outliers over 5 + 5 * 15 + 4 weights.
    assert z.result() == [pytest.approx(3 / 84)]


def test_zscore_needs_no_calibration(identity_model):
    res = score_model(open_model(identity_model), metrics=("zscore",))["zscore"]
    assert res.calibration is None and len(res.importance) == 4
    # Normal-init weights: about 31.7% lie beyond one std; the zeroed matrices pull layer 2 down.
    assert all(0.25 < v < 0.35 for i, v in enumerate(res.importance) if i != IDENTITY)
    assert res.order[0] == IDENTITY


def test_jaccard_counts_set_overlap():
    E = np.eye(6, dtype=np.float32)  # logits = the hidden state itself
    j = Jaccard(1, E, k=2)
    h_in = torch.tensor([[[0, 0, 0, 0, 0, 0], [5, 4, 0, 0, 0, 0]]], dtype=torch.float32)
    h_out = torch.tensor([[[0, 0, 0, 0, 0, 0], [5, 0, 4, 0, 0, 0]]], dtype=torch.float32)
    j.update(0, h_in, h_out)  # last token: {0, 1} vs {0, 2} -> 1/3
    assert j.result() == [pytest.approx(1 - 1 / 3)]
    with pytest.raises(LsaqError, match="top-k"):
        Jaccard(1, E, k=7)


def test_scores_json_round_trip_and_ties():
    assert rank([0.5, 0.1, 0.1, 0.0]) == [3, 1, 2, 0]
    s = Scores(metric="jaccard", params={"k": 10, "final_norm": False},
               calibration={"source": "x", "sha256": "ab", "samples": 2, "seq_len": 4},
               model={"name": "m", "architecture": "LlamaForCausalLM", "num_layers": 4,
                      "fingerprint": "f"},
               importance=[0.5, 0.1, 0.1, 0.0])
    d = json.loads(json.dumps(s.to_json()))
    assert set(d) == {"metric", "params", "calibration", "model", "importance", "order"}
    back = Scores.from_json(d)
    assert back == s and back.order == [3, 1, 2, 0]
    d["order"] = [0, 0, 1, 2]
    with pytest.raises(LsaqError, match="score the model again"):
        Scores.from_json(d)


def test_unknown_metric(identity_model):
    with pytest.raises(LsaqError, match="unknown metric.*jaccard, cosine, zscore"):
        score_model(open_model(identity_model), metrics=("perplexity",))


def test_plot_writes_png(identity_model, tmp_path):
    from lsaq_compile.plots import plot_importance

    res = score_model(open_model(identity_model), metrics=("jaccard", "cosine", "zscore"),
                      calibration=_calib())
    for target, name in ((res, "all.png"), (res["jaccard"], "one.png")):
        p = tmp_path / name
        plot_importance(target, p)
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not C4.is_file(), reason=f"real-model scoring needs the C4 sample at {C4}")
def test_real_smollm2_scores():
    from lsaq_compile.calibration import load_calibration, load_tokenizer

    src = open_model(None)
    cal = load_calibration(C4, load_tokenizer(src), samples=8, seq_len=128)
    res = score_model(src, metrics=("jaccard", "cosine", "zscore"), calibration=cal)
    for s in res.values():
        assert len(s.importance) == 30 and all(0 <= v <= 1 for v in s.importance)
        assert sorted(s.order) == list(range(30))
        assert s.model["num_layers"] == 30 and s.model["architecture"] == "LlamaForCausalLM"
    assert res["jaccard"].calibration["sha256"] == cal.sha256
    orders = [tuple(s.order) for s in res.values()]
    assert len(set(orders)) == 3, "the three metrics should not rank layers identically"
