import numpy as np
import pytest

from lsaq_compile.errors import LsaqError
from lsaq_compile.quantize import QuantScheme, choose_block, quantize, schemes_for

RNG = np.random.default_rng(0)
SCHEMES = [QuantScheme(8), QuantScheme(4), QuantScheme(4, "group", 32, True),
           QuantScheme(4, "group", 64, False), QuantScheme(4, "group", 128, True)]


def _weight(n, k):
    w = RNG.standard_normal((n, k)).astype(np.float32) * 0.05
    w[3] *= 40          # an outlier row: per-channel scales must not leak across rows
    w[5] = 0.0          # an all-zero row
    return w


def _steps(qt):
    """Quantization step of every element [n, k]."""
    return np.repeat(qt.scales.astype(np.float32), qt.block_size, axis=1)[:, : qt.k]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("k", [576, 200, 96])
def test_roundtrip_error_at_most_half_a_step(scheme, k):
    w = _weight(24, k)
    qt = quantize(w, scheme)
    err = np.abs(qt.dequantize() - w)
    assert np.all(err <= 0.5 * _steps(qt) * (1 + 1e-6))
    assert np.all(qt.dequantize()[5] == 0.0)


def test_channel_scale_is_row_max_over_qmax():
    w = _weight(16, 256)
    for bits, qmax in ((8, 127), (4, 7)):
        qt = quantize(w, QuantScheme(bits))
        s = qt.scales.astype(np.float32)
        assert np.all(s == s[:, :1]), "every block of a row shares the row's scale"
        expect = np.abs(w).max(axis=1) / qmax
        nz = expect > 0
        # fp16 rounding goes up, never down, and by less than one fp16 ulp
        assert np.all(s[nz, 0] >= expect[nz])
        assert np.all(s[nz, 0] <= expect[nz] * (1 + 2 ** -10))
        codes = qt.codes().astype(int) - 2 ** (bits - 1)
        assert codes.min() >= -qmax and codes.max() <= qmax


def test_int4_packing_is_exact():
    w = _weight(8, 64)
    qt = quantize(w, QuantScheme(4))
    codes = qt.codes()
    lo, hi = qt.packed & 0xF, qt.packed >> 4
    assert np.array_equal(lo.reshape(8, -1), codes[:, 0::2])
    assert np.array_equal(hi.reshape(8, -1), codes[:, 1::2])
    # repacking the unpacked codes gives the same bytes
    repacked = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    assert np.array_equal(repacked, qt.packed.reshape(8, -1))


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_byte_sizes_match_arrays(scheme):
    n, k = 24, 200
    qt = quantize(_weight(n, k), scheme)
    nb = -(-k // qt.block_size)
    assert qt.packed.shape == (n, nb, qt.block_size * scheme.bits // 8)
    assert qt.packed.dtype == np.uint8 and qt.scales.dtype == np.float16
    assert qt.scales.shape == (n, nb)
    zp = 0
    if not scheme.symmetric:
        assert qt.zero_points.shape == (n, -(-nb * scheme.bits // 8))
        zp = qt.zero_points.nbytes
    assert qt.nbytes == n * nb * qt.block_size * scheme.bits // 8 + n * nb * 2 + zp


def test_block_choice_and_errors():
    assert choose_block(576) == 64 and choose_block(1536) == 256 and choose_block(200) == 32
    with pytest.raises(LsaqError, match="block size"):
        choose_block(576, 48)
    with pytest.raises(LsaqError, match="group size"):
        quantize(_weight(8, 64), QuantScheme(4, "group", 48))
    with pytest.raises(LsaqError, match="unknown quantization scheme"):
        schemes_for("awq")
    assert schemes_for("group", 64)["int4"].name == "int4-g64-sym"
