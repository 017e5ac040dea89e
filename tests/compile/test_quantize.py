import numpy as np
import pytest

from lsaq_compile.errors import LsaqError
from lsaq_compile.quantize import CLIP_RATIOS, QuantScheme, choose_block, quantize, schemes_for

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


# --------------------------------------------------------------------------------------------
# Clipping search (clip "mse" / "mse-act")

CLIPPED = [QuantScheme(4, "channel", block_size=32), QuantScheme(4, "group", 32, True),
           QuantScheme(4, "group", 64, False), QuantScheme(4, "group", 128, True),
           QuantScheme(4, "group", 32, False), QuantScheme(8)]


def _heavy(n, k, seed=1):
    """Student-t (3 dof) weights: a few large values per row, where clipping pays off."""
    return (np.random.default_rng(seed).standard_t(3, (n, k)) * 0.02).astype(np.float32)


def _act(k, seed=2):
    """Activation magnitudes spread over orders of magnitude, as in real models."""
    return (np.random.default_rng(seed).lognormal(0.0, 2.0, k)).astype(np.float32)


def _with(scheme, clip):
    return QuantScheme(scheme.bits, scheme.kind, scheme.group_size, scheme.symmetric,
                       scheme.block_size, clip)


def _group_err(qt, w, act=None, group=None):
    """(Weighted) squared error per (row, group) [n, k / group] in float64; group None: row."""
    d = (qt.dequantize().astype(np.float64) - w) ** 2
    if act is not None:
        d = d * act
    group = group or w.shape[1]
    d = np.pad(d, ((0, 0), (0, (-w.shape[1]) % group)))
    return d.reshape(w.shape[0], -1, group).sum(axis=2)


def _err_group(scheme):
    return scheme.group_size if scheme.kind == "group" else None


@pytest.mark.parametrize("scheme", CLIPPED, ids=lambda s: s.name)
@pytest.mark.parametrize("weights", ["normal", "heavy"])
@pytest.mark.parametrize("clip", ["mse", "mse-act"])
def test_clip_search_never_worse_than_rtn(scheme, weights, clip):
    w = _weight(24, 200) if weights == "normal" else _heavy(24, 200)
    act = _act(200) if clip == "mse-act" else None
    rtn = quantize(w, scheme)
    got = quantize(w, _with(scheme, clip), act=act)
    assert got.scheme.name == f"{scheme.name}-{clip}"
    e_rtn = _group_err(rtn, w, act, _err_group(scheme))
    e_got = _group_err(got, w, act, _err_group(scheme))
    # per row / group (the unit the search works on), up to float32 summation noise
    assert np.all(e_got <= e_rtn * (1 + 1e-5) + 1e-12)
    if weights == "heavy" and scheme.bits == 4:
        assert e_got.sum() < 0.98 * e_rtn.sum()    # and it does find better ranges


def _up16(x: float) -> np.float32:
    """fp16 scale rounded up (never below x), as stored."""
    s = np.float16(x)
    if np.float32(s) < np.float32(x):
        s = np.nextafter(s, np.float16(np.inf))
    return np.float32(s) if s > 0 else np.float32(2.0 ** -24)


def _brute_force(w, scheme, act):
    """Least (weighted) error per (row, group) over CLIP_RATIOS, one group and ratio at a time."""
    n, k = w.shape
    gs = scheme.group_size if scheme.kind == "group" else k
    qmax, levels = 2 ** (scheme.bits - 1) - 1, 2 ** scheme.bits - 1
    out = np.zeros((n, -(-k // gs)))
    for i in range(n):
        for b in range(out.shape[1]):
            x = w[i, b * gs:(b + 1) * gs]
            a = np.ones_like(x) if act is None else act[b * gs:(b + 1) * gs]
            errs = []
            for r in CLIP_RATIOS:
                if scheme.symmetric:
                    s = _up16(np.abs(x).max() * r / np.float32(qmax))
                    deq = np.clip(np.rint(x / s), -qmax, qmax) * s
                else:
                    lo, hi = min(x.min(), 0) * r, max(x.max(), 0) * r
                    s = _up16((hi - lo) / np.float32(levels))
                    zp = np.clip(np.rint(-lo / s), 0, levels)
                    deq = (np.clip(np.rint(x / s) + zp, 0, levels) - zp) * s
                errs.append(float((a.astype(np.float64) * (deq.astype(np.float64) - x) ** 2).sum()))
            out[i, b] = min(errs)
    return out


@pytest.mark.parametrize("scheme", CLIPPED[:5], ids=lambda s: s.name)
@pytest.mark.parametrize("clip", ["mse", "mse-act"])
def test_clip_search_finds_the_grid_optimum(scheme, clip):
    w = _heavy(6, 160, seed=3)
    act = _act(160, seed=4) if clip == "mse-act" else None
    got = _group_err(quantize(w, _with(scheme, clip), act=act), w, act, _err_group(scheme))
    want = _brute_force(w, scheme, act)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)
    # the optimum is not just round to nearest here: the test can tell a no-op search apart
    rtn = _group_err(quantize(w, scheme), w, act, _err_group(scheme))
    assert np.any(want < rtn * (1 - 1e-3))


@pytest.mark.parametrize("scheme", CLIPPED[:5], ids=lambda s: s.name)
def test_activation_weighting_lowers_the_weighted_error(scheme):
    """Outlier weights sit in input features whose activations are ~0, the rest see large
    ones: weighted by activations, clipping the outliers is nearly free and worth it, which
    the unweighted search cannot know (it keeps them, at the other weights' expense)."""
    n, k = 16, 256
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    quiet = np.arange(0, k, 16)                        # one feature per 16: outliers, silent input
    w[:, quiet] = rng.choice([-1, 1], (n, len(quiet))) * 0.2
    act = np.ones(k, np.float32)
    act[quiet] = 1e-4
    plain = quantize(w, _with(scheme, "mse"))
    weighted = quantize(w, _with(scheme, "mse-act"), act=act)
    e_plain = _group_err(plain, w, act).sum()
    e_weighted = _group_err(weighted, w, act).sum()
    assert e_weighted < 0.5 * e_plain
    # ... and the unweighted search is still the better one by its own measure
    assert _group_err(plain, w).sum() < _group_err(weighted, w).sum()


@pytest.mark.parametrize("scheme", CLIPPED, ids=lambda s: s.name)
@pytest.mark.parametrize("clip", ["mse", "mse-act"])
def test_clipped_codes_scales_and_zero_points_stay_in_range(scheme, clip):
    n, k = 24, 200
    w = _heavy(n, k)
    w[5] = 0.0                                           # an all-zero row
    qt = quantize(w, _with(scheme, clip), act=_act(k) if clip == "mse-act" else None)
    all_codes = qt.codes().astype(int)
    codes = all_codes[:, :k]                             # per-channel pads K with code 0
    assert qt.scales.dtype == np.float16 and np.all(np.isfinite(qt.scales))
    assert np.all(qt.scales.astype(np.float32) > 0)
    if scheme.symmetric:
        qmax = 2 ** (scheme.bits - 1) - 1
        assert qt.zero_points is None
        assert codes.min() >= 2 ** (scheme.bits - 1) - qmax and codes.max() <= 2 ** (scheme.bits - 1) + qmax
    else:
        assert codes.min() >= 0 and codes.max() <= 2 ** scheme.bits - 1
        zp = qt.zero_point_values()
        assert zp.min() >= 0 and zp.max() <= 2 ** scheme.bits - 1
    # dequantize() is (code - zero point) * fp16 scale, element by element
    c = all_codes.reshape(n, qt.n_blocks, qt.block_size).astype(np.float32)
    by_hand = (c - qt.zero_point_values()[..., None]) * qt.scales.astype(np.float32)[..., None]
    np.testing.assert_array_equal(qt.dequantize(), by_hand.reshape(n, -1)[:, :k])
    assert np.all(qt.dequantize()[5] == 0.0)
    # the padded tail of group schemes dequantizes to 0
    if scheme.kind == "group":
        assert np.all(by_hand.reshape(n, -1)[:, k:] == 0.0)
    # same bytes as round to nearest: clipping changes values, not the layout
    rtn = quantize(w, scheme)
    assert qt.packed.shape == rtn.packed.shape and qt.nbytes == rtn.nbytes


def test_clip_errors():
    w = _weight(8, 64)
    with pytest.raises(LsaqError, match="mse-act.*activation statistics"):
        quantize(w, QuantScheme(4, "group", 32, clip="mse-act"))
    with pytest.raises(LsaqError, match="activation statistics must be 64"):
        quantize(w, QuantScheme(4, clip="mse-act"), act=np.ones(32, np.float32))
    with pytest.raises(LsaqError, match="activation statistics must be"):
        quantize(w, QuantScheme(4, clip="mse-act"), act=np.full(64, np.nan, np.float32))
    with pytest.raises(LsaqError, match="unknown clip"):
        quantize(w, QuantScheme(4, clip="awq"))
    with pytest.raises(LsaqError, match="unknown clip"):
        schemes_for("channel", clip="minmax")
    s = schemes_for("group", 64, symmetric=False, clip="mse-act")
    assert s["int4"].name == "int4-g64-asym-mse-act" and s["int8"].name == "int8-channel-sym"
    assert schemes_for("channel", block_size=32, clip="mse")["int4"].name == "int4-channel-sym-mse"
    # r = 1 comes first: round to nearest is always a candidate
    assert CLIP_RATIOS[0] == 1.0 and CLIP_RATIOS.min() <= 0.5 + 1e-6
    # clip 'mse' takes no statistics (and ignores any given); 'none' is round to nearest
    np.testing.assert_array_equal(quantize(w, QuantScheme(4, clip="mse"), act=np.ones(64)).packed,
                                  quantize(w, QuantScheme(4, clip="mse")).packed)


@pytest.mark.parametrize("scheme", SCHEMES + [QuantScheme(4, "group", 32, False, clip="mse-act"),
                                             QuantScheme(4, clip="mse")], ids=lambda s: s.name)
def test_row_ranges_on_threads_store_the_same_bytes(scheme, monkeypatch):
    """A large weight is quantized by row ranges on several threads (and the clipping search
    walks long steps, so threads run beside each other): the bytes must be one range's."""
    import lsaq_compile.quantize as Q

    w = _weight(61, 200)   # odd rows: ranges of unequal length; K = 200 pads the last group
    act = RNG.random(200).astype(np.float32) if scheme.clip == "mse-act" else None
    one = quantize(w, scheme, act=act, workers=1)
    for workers in (2, 3, 61, 100):
        many = quantize(w, scheme, act=act, workers=workers)
        assert many.n == one.n and many.k == one.k and many.block_size == one.block_size
        for a, b in ((many.packed, one.packed), (many.scales, one.scales),
                     (many.zero_points, one.zero_points)):
            assert (a is None) == (b is None)
            assert a is None or (a.dtype == b.dtype and np.array_equal(a, b)), workers
    # the search's step length (rows a step) does not change a row's result either
    monkeypatch.setattr(Q, "_CHUNK", 1 << 9)
    assert np.array_equal(quantize(w, scheme, act=act, workers=1).packed, one.packed)
    # the default splits a weight past the threshold over the usable CPUs
    monkeypatch.setattr(Q, "_PARALLEL_MIN", 1000)
    monkeypatch.setattr(Q, "_workers", lambda: 4)
    seen = []
    real = Q._quantize
    monkeypatch.setattr(Q, "_quantize", lambda w, *a: seen.append(len(w)) or real(w, *a))
    auto = quantize(w, scheme, act=act)
    assert sorted(seen) == [15, 15, 15, 16] and np.array_equal(auto.packed, one.packed)
    seen.clear()
    quantize(w[:4, :200], scheme, act=act)   # 800 elements: below the threshold, one range
    assert seen == [4]


def test_an_error_on_a_thread_is_the_callers_one_line():
    w = _weight(64, 128)
    with pytest.raises(LsaqError, match="activation statistics must be 128"):
        quantize(w, QuantScheme(4, "group", 32, False, clip="mse-act"),
                 act=np.ones(7, np.float32), workers=2)


def test_the_torch_search_gives_back_torchs_threads(monkeypatch):
    """The weighted search turns torch's own threads off while it runs (row ranges are on
    every CPU already): the caller's setting comes back, after an error too."""
    import torch

    import lsaq_compile.quantize as Q

    scheme = QuantScheme(4, "group", 32, False, clip="mse-act")
    w, act = _weight(64, 128), _act(128)
    original = torch.get_num_threads()
    torch.set_num_threads(3)            # whatever the machine: a setting that is not 1
    try:
        seen = []
        real = Q._search_weighted
        monkeypatch.setattr(Q, "_search_weighted",
                            lambda *a: seen.append(torch.get_num_threads()) or real(*a))
        quantize(w, scheme, act=act, workers=2)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 3
        monkeypatch.setattr(Q, "_search_weighted", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            quantize(w, scheme, act=act)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(original)


@pytest.mark.parametrize("gs", [1, 2, 32, 64, 128])
def test_torch_weighted_sum_is_numpys_einsum_bit_for_bit(gs):
    """The ratios only match numpy's search if every error does: the torch search's weighted sum
    of squares must be the three-operand einsum's to the last bit (its order of additions),
    which a pairwise sum is not (checked: the test tells them apart)."""
    import torch

    import lsaq_compile.quantize as Q

    rng = np.random.default_rng(gs)
    d = (rng.standard_t(3, (37, 11, gs)) * 0.02).astype(np.float32)
    act = _act(11 * gs, seed=gs).reshape(11, gs)
    want = np.einsum("nbg,nbg,bg->nb", d, d, act, optimize=False)
    assert np.array_equal(Q._weighted_sq(d, act), want)
    dt = torch.from_numpy(d).permute(2, 0, 1).contiguous()
    wt = torch.from_numpy(np.ascontiguousarray(act.T)).reshape(gs, 1, 11)
    got = Q._weighted_sq_t(dt.clone(), wt, torch.empty(37, 11)).numpy()
    assert np.array_equal(got, want)
    if gs >= 32:   # a pairwise sum differs somewhere: the comparison can fail
        assert not np.array_equal((dt * dt * wt).sum(0).numpy(), want)


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_in_place_search_chooses_what_the_plain_expressions_choose(symmetric, gs):
    """The search computes every candidate's error in one scratch buffer (a fresh temporary per
    numpy call cost as much system time as the arithmetic), and the weighted one in torch, laid
    out [gs, rows, groups] (quantize._search_weighted): the ratios it picks must be, bit for
    bit, those of the plain out-of-place numpy expressions over the whole weight at once, on
    ordinary rows and on the edges of float16 scales (zero rows, subnormal and tiny ranges,
    ranges past float16's largest value)."""
    import lsaq_compile.quantize as Q

    n, k = 46, 6 * gs + gs // 4 * 3                   # K pads the last group
    w = _heavy(n, k, seed=7)
    w[40] = 0.0
    w[41] *= 1e-4                                     # scales in float16's subnormal range
    w[42] *= 1e-7                                     # ranges below its smallest value (2^-24)
    w[43] *= 4e6                                      # scales past its largest (65504): inf
    w[44, : k // 2] = 0.0                             # zero groups beside ordinary ones
    w[45] = np.abs(w[45])                             # one-signed rows: lo (or hi) is 0
    act = _act(k, seed=8)
    pad = (-k) % gs
    g = np.pad(w, ((0, 0), (0, pad))).reshape(n, -1, gs)
    a = np.pad(act, (0, pad)).reshape(-1, gs)         # padded features: weight 0
    qmax, levels = 7, 15
    amax = np.abs(g).max(axis=2)
    lo, hi = np.minimum(g.min(axis=2), 0.0), np.maximum(g.max(axis=2), 0.0)

    def err(r):
        with np.errstate(all="ignore"):   # the inf scales: inf - inf, as in the search
            if symmetric:
                s = Q._fp16_scale_up(amax * r / qmax).astype(np.float32)[..., None]
                d = np.clip(np.rint(g / s), -qmax, qmax) * s - g
            else:
                s, zp = Q._asym_scale_zp(lo * r, hi * r, levels)
                s, zp = s.astype(np.float32)[..., None], zp.astype(np.float32)[..., None]
                d = (np.clip(np.rint(g / s) + zp, 0, levels) - zp) * s - g
            return np.einsum("nbg,nbg,bg->nb", d, d, a, optimize=False)

    best, best_err = np.ones(g.shape[:2], np.float32), err(CLIP_RATIOS[0])
    for r in CLIP_RATIOS[1:]:
        e = err(r)
        best, best_err = np.where(e < best_err, r, best), np.minimum(e, best_err)
    assert np.any(best < 1)                          # a search that clips somewhere
    old, old_max = Q._CHUNK, Q._WEIGHTED_GS_MAX
    try:
        # torch (the default for these groups) and numpy's einsum (what it replaced); one
        # step, and steps of 2 rows
        for gs_max, chunk in ((128, 1 << 19), (128, 2 * g[0].size), (0, 1 << 19), (0, 1 << 8)):
            Q._CHUNK, Q._WEIGHTED_GS_MAX = chunk, gs_max
            with np.errstate(all="ignore"):
                if symmetric:
                    got = Q._sym_range(g, qmax, "mse-act", a)
                    assert np.array_equal(got, amax * best), (gs_max, chunk)
                else:
                    glo, ghi = Q._asym_range(g, levels, "mse-act", a)
                    assert np.array_equal(glo, lo * best) and np.array_equal(ghi, hi * best), \
                        (gs_max, chunk)
    finally:
        Q._CHUNK, Q._WEIGHTED_GS_MAX = old, old_max
