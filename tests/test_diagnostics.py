"""Diagnostics against hand-computed examples, and on noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

import kpo_rs
from helpers import requires
from kpo_rs import diagnostics as D


def test_switches_hand_checked():
    values = np.array([[0.5, -0.2, -0.1, 0.3, 0.0, 0.4], [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    mask = np.array([[True, True, True, True, True, True], [True, True, True, False, False, False]])
    s = D.token_switches(values, mask)
    # row 0: + - - + 0 +: switches at (+,-) and (-,+); a zero makes none
    np.testing.assert_array_equal(s.per_row, [2, 0])
    np.testing.assert_array_equal(s.pairs, [5, 2])
    assert s.frequency == pytest.approx(2 / 7)
    np.testing.assert_allclose(s.row_frequency, [2 / 5, 0.0])


def test_switches_skip_masked_positions_and_ratio_space():
    values = np.array([[1.5, 0.5, 2.0, 0.9]])  # ratios: signs of r - 1: + - + -
    mask = np.array([[True, False, True, True]])  # valid: 1.5, 2.0, 0.9: + + -
    s = D.token_switches(values, mask, space="ratio")
    assert s.per_row.tolist() == [1] and s.pairs.tolist() == [2]
    with pytest.raises(ValueError, match="space"):
        D.token_switches(values, space="prob")


def test_run_lengths_hand_checked():
    values = np.array([[0.5, 0.2, -0.1, -0.3, -0.2, 0.4, 0.1]])
    assert D.run_lengths(values)[0].tolist() == [2, 3, 2]
    mask = np.array([[True, True, False, False, False, True, True]])
    assert D.run_lengths(values, mask)[0].tolist() == [4]
    assert D.run_lengths(np.zeros((1, 0)))[0].tolist() == []


def test_packed_equals_padded():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 40))
    mask = rng.random((5, 40)) < 0.7
    cu = np.arange(6, dtype=np.int64) * 40
    a = D.token_switches(values, mask)
    b = D.token_switches_packed(values.ravel(), cu, mask.ravel())
    np.testing.assert_array_equal(a.per_row, b.per_row)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    for x, y in zip(
        D.run_lengths(values, mask), D.run_lengths_packed(values.ravel(), cu, mask.ravel())
    ):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(
        D.low_frequency_energy(values, mask),
        D.low_frequency_energy_packed(values.ravel(), cu, mask.ravel()),
    )
    # Empty segments are rows without pairs.
    s = D.token_switches_packed(np.array([1.0, -1.0]), np.array([0, 0, 2, 2]))
    assert s.per_row.tolist() == [0, 1, 0] and s.pairs.tolist() == [0, 1, 0]


def test_low_frequency_energy_hand_checked():
    t = np.arange(200)
    slow = np.sin(2 * np.pi * t / 100)  # 0.01 cycles per token
    fast = np.sin(2 * np.pi * t * 0.25)  # 0.25 cycles per token
    energy = D.low_frequency_energy(np.stack([slow, fast, slow + fast]), cutoff=0.05)
    np.testing.assert_allclose(energy, [1.0, 0.0, 0.5], atol=1e-9)
    assert math.isnan(D.low_frequency_energy(np.ones((1, 10)))[0])  # no variation
    with pytest.raises(ValueError, match="cutoff"):
        D.low_frequency_energy(np.ones((1, 10)), cutoff=0.7)


def test_iid_noise_switches_about_half_the_time_and_far_less_after_filtering():
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 0.3, (64, 2048))
    raw = D.token_switches(z).frequency
    filtered = D.token_switches(kpo_rs.kalman_filter(z)).frequency
    assert abs(raw - 0.5) < 0.01
    assert filtered < 0.05
    assert (
        D.low_frequency_energy(kpo_rs.kalman_filter(z)).mean()
        > 0.5
        > D.low_frequency_energy(z).mean()
    )


def test_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        D.token_switches(np.zeros(3))
    with pytest.raises(TypeError, match="bool"):
        D.token_switches(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        D.run_lengths(np.zeros((2, 2)), np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match="cu_seqlens"):
        D.token_switches_packed(np.zeros(3), np.array([0, 4]))


@requires("matplotlib")
def test_plots_are_pngs(tmp_path):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(4, 64))
    x = kpo_rs.kalman_filter(z, p0=math.inf, q=1e-2)
    paths = [
        D.plot_traces(z[0], x[0], str(tmp_path / "t.png")),
        D.plot_spectra({"raw": list(z), "filtered": list(x)}, str(tmp_path / "s.png")),
        D.plot_switch_histogram(
            {
                "raw": D.token_switches(z).row_frequency,
                "filtered": D.token_switches(x).row_frequency,
            },
            str(tmp_path / "h.png"),
        ),
    ]
    for p in paths:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_welch_spectrum_of_white_noise_is_flat_at_its_variance():
    rng = np.random.default_rng(3)
    rows = [rng.normal(0.0, 2.0, n) for n in rng.integers(100, 3000, 60)]
    freq, power, segments = D.welch_spectrum(rows, 64)
    assert freq.shape == power.shape == (33,) and freq[-1] == 0.5
    # about 60 * 1550 / 32 = 2900 segments: the mean over 31 inner bins is within 2% of 4
    assert segments > 2000
    assert abs(power[1:-1].mean() - 4.0) < 0.08


def test_welch_spectrum_finds_a_tone_in_rows_of_any_length():
    rows = [np.sin(2 * np.pi * 0.125 * np.arange(n) + n) for n in (64, 300, 1000, 77)]
    freq, power, _ = D.welch_spectrum(rows)
    assert freq.size == 128 // 2 + 1  # default: 128, the power of two below the median 188
    assert freq[np.argmax(power)] == 0.125


def test_welch_spectrum_one_segment_by_hand_and_edge_cases():
    x = np.random.default_rng(4).normal(size=16)
    w = np.hanning(18)[1:-1]
    want = np.abs(np.fft.rfft((x - x.mean()) * w)) ** 2 / (w * w).sum()
    _, power, segments = D.welch_spectrum([x, x[:10]], 16)  # the short row is left out
    assert segments == 1
    np.testing.assert_allclose(power, want, rtol=1e-12)  # the same sums, rounding apart
    _, power, segments = D.welch_spectrum([np.ones(3)], 8)
    assert segments == 0 and np.isnan(power).all()
    assert D.welch_spectrum([np.ones(20)] * 3)[0].size == 16 // 2 + 1  # median 20 -> 16
    assert D.welch_spectrum([np.ones(3)])[0].size == 8 // 2 + 1  # at least 8
    with pytest.raises(ValueError, match="nperseg"):
        D.welch_spectrum([x], 2)
