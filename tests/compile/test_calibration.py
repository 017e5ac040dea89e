"""Calibration windows: shape, determinism, fingerprint, clear errors, offline default."""

import socket

import numpy as np
import pytest

from lsaq_compile.calibration import default_text, load_calibration, load_tokenizer
from lsaq_compile.errors import LsaqError
from lsaq_compile.model_source import open_model


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    return load_tokenizer(open_model(tiny_llama_dir))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"word{i % 97} ünïcödé" for i in range(3000)), encoding="utf-8")
    return p


def test_windows_shape_and_placement(tok, text_file):
    cal = load_calibration(text_file, tok, samples=5, seq_len=40)
    assert cal.windows.shape == (5, 40) and cal.windows.dtype == np.int64
    assert (cal.samples, cal.seq_len, cal.source) == (5, 40, str(text_file))
    ids = np.asarray(tok.encode_text(text_file.read_text(encoding="utf-8")))
    # Each window is a contiguous slice of the token stream; starts are evenly spaced and the
    # stride is at least seq_len, so windows never overlap and reach the end of the text.
    stride = len(ids) // 5
    assert stride >= 40
    for j, w in enumerate(cal.windows):
        assert np.array_equal(w, ids[j * stride: j * stride + 40])


def test_deterministic_and_fingerprinted(tok, text_file, tmp_path):
    a = load_calibration(text_file, tok, samples=4, seq_len=32)
    b = load_calibration(text_file, tok, samples=4, seq_len=32)
    assert np.array_equal(a.windows, b.windows) and a.sha256 == b.sha256
    # The fingerprint covers the windowing settings and the text, not just the file name.
    assert load_calibration(text_file, tok, samples=4, seq_len=16).sha256 != a.sha256
    assert load_calibration(text_file, tok, samples=3, seq_len=32).sha256 != a.sha256
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text(encoding="utf-8") + " more", encoding="utf-8")
    assert load_calibration(other, tok, samples=4, seq_len=32).sha256 != a.sha256


def test_clear_errors(tok, tmp_path):
    with pytest.raises(LsaqError, match="calibration file not found"):
        load_calibration(tmp_path / "nope.txt", tok)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 100)
    with pytest.raises(LsaqError, match="not UTF-8.*iconv"):
        load_calibration(latin1, tok)
    short = tmp_path / "short.txt"
    short.write_text("only a few words here", encoding="utf-8")
    n = len(tok.encode_text("only a few words here"))
    with pytest.raises(LsaqError, match=rf"{n} tokens, but 32 windows x 256 tokens need 8192; "
                                        r"use fewer samples"):
        load_calibration(short, tok, samples=32, seq_len=256)
    with pytest.raises(LsaqError, match="samples >= 1"):
        load_calibration(short, tok, samples=0)


def test_default_is_offline_and_deterministic(tok, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the default calibration must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    a = load_calibration(None, tok)  # the defaults: 32 x 256
    b = load_calibration(None, tok)
    assert a.windows.shape == (32, 256) and a.source.startswith("builtin:python-3.")
    assert np.array_equal(a.windows, b.windows) and a.sha256 == b.sha256
    text = default_text()
    assert "Command-line parsing library" in text  # argparse's docstring leads the text
    assert "@-@" not in text  # nothing from WikiText


def test_tokenizer_missing_is_clear(tiny_llama_dir, tmp_path):
    import shutil

    d = tmp_path / "notok"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / f, d / f)
    with pytest.raises(LsaqError, match="cannot load the model's tokenizer"):
        load_tokenizer(open_model(d))


def test_held_out_windows_sit_in_the_gaps(tok, text_file):
    plain = load_calibration(text_file, tok, samples=5, seq_len=40)
    cal = load_calibration(text_file, tok, samples=5, seq_len=40, held_out=7)
    # the scoring windows and their fingerprint do not move
    assert np.array_equal(cal.windows, plain.windows) and cal.sha256 == plain.sha256
    assert plain.held_out is None and cal.held_out.shape == (7, 40)
    ids = np.asarray(tok.encode_text(text_file.read_text(encoding="utf-8")))
    stride = len(ids) // 5
    used = set()
    for j in range(5):
        used |= set(range(j * stride, j * stride + 40))
    for w in cal.held_out:
        starts = [s for s in range(len(ids) - 39) if np.array_equal(ids[s:s + 40], w)]
        assert starts and not used & set(range(starts[0], starts[0] + 40))
        used |= set(range(starts[0], starts[0] + 40))
    with pytest.raises(LsaqError, match="held-out windows"):
        load_calibration(text_file, tok, samples=5, seq_len=40, held_out=10_000)
