"""Sampling rules and streaming detokenization (no bundle needed)."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from lsaq_runtime.errors import LsaqRuntimeError
from lsaq_runtime.sampling import Sampler
from lsaq_runtime.text import StreamDecoder


def test_greedy():
    logits = np.array([0.1, 3.0, 2.9, -1.0], np.float32)
    assert Sampler()(logits) == 1
    assert Sampler(temperature=1.0, top_k=1, seed=0)(logits) == 1


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    a = [Sampler(0.9, 50, 0.9, seed=5)(logits) for _ in range(3)]
    s1, s2 = Sampler(0.9, 50, 0.9, seed=5), Sampler(0.9, 50, 0.9, seed=5)
    assert [s1(logits) for _ in range(20)] == [s2(logits) for _ in range(20)]
    assert len(set(a)) == 1  # a fresh sampler with the same seed gives the same first draw


def test_top_k_and_top_p_restrict_the_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(1.0, top_k=2, seed=1)
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = Sampler(1.0, top_p=0.7, seed=1)       # 0.5 + 0.3 reaches 0.7
    assert {s(logits) for _ in range(300)} == {0, 1}
    s = Sampler(1.0, top_p=0.4, seed=1)       # the best token alone
    assert {s(logits) for _ in range(50)} == {0}
    s = Sampler(1.0, seed=1)
    draws = [s(logits) for _ in range(4000)]
    assert abs(draws.count(0) / 4000 - 0.5) < 0.04


def test_bad_arguments():
    for kw in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0}, {"top_p": 1.5}):
        with pytest.raises(LsaqRuntimeError):
            Sampler(**kw)


class _Codec:
    """The part of TextCodec that StreamDecoder uses, over a byte-level BPE tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids):
        return self.tok.decode(list(ids), skip_special_tokens=True)


def _byte_tokenizer():
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_stream_decoder_multibyte():
    tok = _byte_tokenizer()
    text = "Grüße aus Zürich — 東京 🙂 done"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    dec = StreamDecoder(_Codec(tok))
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10  # it really streams
