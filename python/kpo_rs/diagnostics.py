"""How noisy are the importance ratios? Diagnostics from the KPO paper's analysis (numpy only).

The paper's exact definitions are not public; these are ours:

- a **switch** is a sign change of the log-ratio (equivalently of ``r - 1``) between adjacent valid
  tokens of a response (masked positions are skipped; a zero breaks no run and makes no switch);
  the **switch frequency** is switches / adjacent valid pairs;
- **run lengths** are the lengths of maximal runs of valid tokens without a switch;
- **low-frequency energy** is the share of a response's spectral energy (valid tokens in order,
  mean removed, power ``|rfft|^2``) at frequencies below ``cutoff`` cycles per token.

Every function takes padded ``values [batch, time]`` with an optional bool ``mask``, or packed
``values [total]`` with ``cu_seqlens [batch + 1]`` (the ``*_packed`` variants). ``space="ratio"``
means the values are ratios (signs of ``r - 1``); ``"log_ratio"`` (default) log-ratios.

:func:`welch_spectrum` averages the power spectra of rows of any lengths (Welch's method: half-
overlapping windowed segments of one length), so that long and short responses all count.

The filter's activity: :func:`data_weight` (per position, the weight the filtered value puts on
the observations rather than on the prior mean ``m0``), :func:`mean_data_weight` (its mean over a
row of a given length, what ``kpo_data_weight`` reports) and :func:`effective_window` (the tokens
the steady-state filter averages over). At the KPO authors' settings (q = 1e-6, r = 1, p0 = 0)
the mean data weight is 0.28% over 128 tokens and 4.1% over 512: the filter is nearly inert.

Plots (matplotlib, optional): :func:`plot_traces`, :func:`plot_spectra`,
:func:`plot_switch_histogram`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import gains
from ._plotting import pyplot, save
from .params import FilterParams, Overrides, resolve_params

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "Switches",
    "data_weight",
    "effective_window",
    "low_frequency_energy",
    "low_frequency_energy_packed",
    "mean_data_weight",
    "plot_spectra",
    "plot_switch_histogram",
    "plot_traces",
    "run_lengths",
    "run_lengths_packed",
    "token_switches",
    "token_switches_packed",
    "welch_spectrum",
]


def data_weight(
    n: int, *, params: FilterParams | None = None, **overrides: Unpack[Overrides]
) -> np.ndarray:
    """``1 - prod_{k<=t} (1 - K_k)`` for ``t = 0 .. n-1``, float64 ``[n]``: at the ``t``-th valid
    token, the share of the filtered value's weight on the observations so far (the rest is on
    the prior mean ``m0``). Depends on ``q``, ``r``, ``p0`` only; 1 everywhere when ``p0 = inf``."""
    return 1.0 - np.cumprod(1.0 - gains(n, params=params, **overrides))


def mean_data_weight(
    length: int, *, params: FilterParams | None = None, **overrides: Unpack[Overrides]
) -> float:
    """Mean of :func:`data_weight` over a row of ``length`` valid tokens (0 for length 0)."""
    if length <= 0:
        return 0.0
    return float(np.mean(data_weight(int(length), params=params, **overrides)))


def effective_window(params: FilterParams | None = None, **overrides: Unpack[Overrides]) -> float:
    """``1 / K_inf`` (tokens): the horizon of the steady-state filter's exponential average, with
    ``K_inf = S / (S + r)``, ``S = (q + sqrt(q^2 + 4 q r)) / 2``; inf when ``q = 0`` (the gains
    fall to 0: a mean over the whole row, or nothing with ``p0 = 0``), 1 when ``q = inf``."""
    p = resolve_params(params, **overrides)
    q, r = p.q, p.r
    if q == 0.0:
        return math.inf
    if math.isinf(q):
        return 1.0
    s = 0.5 * (q + math.sqrt(q * q + 4.0 * q * r))
    return (s + r) / s


@dataclass(frozen=True)
class Switches:
    """Per row (``[batch]``): ``per_row`` switches and ``pairs`` of adjacent valid tokens."""

    per_row: np.ndarray
    pairs: np.ndarray

    @property
    def frequency(self) -> float:
        """Switches over all pairs (NaN when there are no pairs)."""
        total = int(self.pairs.sum())
        return float(self.per_row.sum() / total) if total else float("nan")

    @property
    def row_frequency(self) -> np.ndarray:
        """Per-row switch frequency (NaN for rows without pairs)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.pairs > 0, self.per_row / np.maximum(self.pairs, 1), np.nan)


def _signs(values: np.ndarray, space: str) -> np.ndarray:
    if space == "log_ratio":
        centred = values
    elif space == "ratio":
        centred = values - 1.0
    else:
        raise ValueError(f"space must be 'log_ratio' or 'ratio', got {space!r}")
    return np.sign(centred)


def _compact_padded(values: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    """The valid tokens of each row, packed: ``(flat values, cu_seqlens)``."""
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"values must be 2-D [batch, time], got shape {values.shape}")
    if mask is None:
        mask = np.ones(values.shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must have dtype bool, got {mask.dtype}")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {mask.shape} differs from values shape {values.shape}")
    counts = mask.sum(axis=1)
    cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return values[mask].astype(np.float64), cu


def _compact_packed(values: Any, cu_seqlens: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values)
    cu = np.asarray(cu_seqlens)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D [total], got shape {values.shape}")
    from . import _core

    _core.check_offsets(
        cu if cu.dtype in (np.int32, np.int64) else cu.astype(np.int64), values.shape[0]
    )
    cu = cu.astype(np.int64)
    if mask is None:
        return values.astype(np.float64), cu
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != values.shape:
        raise ValueError(
            f"mask must be bool of shape {values.shape}, got {mask.dtype} {mask.shape}"
        )
    kept = np.concatenate([[0], np.cumsum(mask)])
    return values[mask].astype(np.float64), kept[cu].astype(np.int64)


def _switch_flags(flat: np.ndarray, cu: np.ndarray, space: str) -> tuple[np.ndarray, np.ndarray]:
    """``(switch, same_row)`` per adjacent pair of the packed valid tokens."""
    s = _signs(flat, space)
    switch = s[1:] * s[:-1] < 0
    same_row = np.ones(max(flat.size - 1, 0), dtype=bool)
    starts = cu[1:-1]
    starts = starts[(starts > 0) & (starts < flat.size)]
    same_row[starts - 1] = False  # the pair across a row boundary
    return switch & same_row, same_row


def _switches(flat: np.ndarray, cu: np.ndarray, space: str) -> Switches:
    switch, _ = _switch_flags(flat, cu, space)
    lengths = np.diff(cu)
    pairs = np.maximum(lengths - 1, 0)
    counts = np.zeros(lengths.size, dtype=np.int64)
    if switch.size:
        row_of_pair = np.searchsorted(cu, np.arange(switch.size), side="right") - 1
        np.add.at(counts, row_of_pair[switch], 1)
    return Switches(counts, pairs)


def token_switches(values: Any, mask: Any = None, *, space: str = "log_ratio") -> Switches:
    """Sign switches between adjacent valid tokens of each row of a padded batch."""
    return _switches(*_compact_padded(values, mask), space)


def token_switches_packed(
    values: Any, cu_seqlens: Any, mask: Any = None, *, space: str = "log_ratio"
) -> Switches:
    """:func:`token_switches` for packed rows."""
    return _switches(*_compact_packed(values, cu_seqlens, mask), space)


def _run_lengths(flat: np.ndarray, cu: np.ndarray, space: str) -> list[np.ndarray]:
    switch, _ = _switch_flags(flat, cu, space)
    out = []
    for s, e in zip(cu[:-1], cu[1:]):
        if e == s:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        cuts = np.flatnonzero(switch[s : e - 1]) + 1  # a run starts after each switch
        bounds = np.concatenate([[0], cuts, [e - s]])
        out.append(np.diff(bounds).astype(np.int64))
    return out


def run_lengths(values: Any, mask: Any = None, *, space: str = "log_ratio") -> list[np.ndarray]:
    """Lengths of the same-sign runs of each row (a list of int arrays, one per row)."""
    return _run_lengths(*_compact_padded(values, mask), space)


def run_lengths_packed(
    values: Any, cu_seqlens: Any, mask: Any = None, *, space: str = "log_ratio"
) -> list[np.ndarray]:
    """:func:`run_lengths` for packed rows."""
    return _run_lengths(*_compact_packed(values, cu_seqlens, mask), space)


def _low_frequency(flat: np.ndarray, cu: np.ndarray, cutoff: float) -> np.ndarray:
    if not 0.0 < cutoff <= 0.5:
        raise ValueError(f"cutoff must be in (0, 0.5] cycles per token, got {cutoff}")
    out = np.full(cu.size - 1, np.nan)
    for i, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        if e - s < 2:
            continue
        v = flat[s:e] - flat[s:e].mean()
        power = np.abs(np.fft.rfft(v)) ** 2
        freq = np.fft.rfftfreq(e - s)
        total = power[1:].sum()
        if total > 0:
            out[i] = power[1:][freq[1:] < cutoff].sum() / total
    return out


def low_frequency_energy(values: Any, mask: Any = None, *, cutoff: float = 0.05) -> np.ndarray:
    """Per row, the share of spectral energy below ``cutoff`` cycles per token (mean removed);
    NaN for rows with fewer than two valid tokens or no variation. ``[batch]`` float64."""
    return _low_frequency(*_compact_padded(values, mask), cutoff)


def low_frequency_energy_packed(
    values: Any, cu_seqlens: Any, mask: Any = None, *, cutoff: float = 0.05
) -> np.ndarray:
    """:func:`low_frequency_energy` for packed rows."""
    return _low_frequency(*_compact_packed(values, cu_seqlens, mask), cutoff)


def welch_spectrum(
    rows: Sequence[np.ndarray], nperseg: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean power spectrum of rows of different lengths, by Welch's method.

    Each row (1-D, any length) is cut into segments of ``nperseg`` tokens that overlap by half
    (the last ``len % (nperseg // 2)`` tokens of a row are left out); each segment has its mean
    removed and a Hann window ``w`` applied, and its periodogram ``|rfft(w x)|^2 / sum(w^2)`` is
    averaged over every segment of every row. With this scaling white noise of variance ``s^2``
    has power ``s^2`` at every frequency above 0. Rows shorter than ``nperseg`` are left out.

    Args:
        rows: 1-D float arrays (the valid tokens of each response, in order).
        nperseg: segment length, >= 4; default the largest power of two not above the median row
            length, clipped to [8, 256].

    Returns:
        ``(freq, power, segments)``: ``freq`` ``[nperseg // 2 + 1]`` in cycles per token,
        ``power`` of the same shape (NaN when no row is long enough), and the number of segments
        averaged.
    """
    lengths = [int(np.size(r)) for r in rows]
    if nperseg is None:
        median = int(np.median(lengths)) if lengths else 8
        nperseg = 1 << max(3, min(8, max(median, 1).bit_length() - 1))
    if isinstance(nperseg, bool) or not isinstance(nperseg, (int, np.integer)) or nperseg < 4:
        raise ValueError(f"nperseg must be an int >= 4, got {nperseg!r}")
    window = np.hanning(nperseg + 2)[1:-1]  # no zero end points
    scale = float((window * window).sum())
    total = np.zeros(nperseg // 2 + 1)
    segments = 0
    step = nperseg // 2
    for row, n in zip(rows, lengths):
        if n < nperseg:
            continue
        seg = np.lib.stride_tricks.sliding_window_view(np.asarray(row, dtype=np.float64), nperseg)
        seg = seg[::step]
        seg = (seg - seg.mean(axis=1, keepdims=True)) * window
        total += (np.abs(np.fft.rfft(seg, axis=1)) ** 2).sum(axis=0) / scale
        segments += seg.shape[0]
    power = total / segments if segments else np.full(total.shape, np.nan)
    return np.fft.rfftfreq(nperseg), power, segments


# --------------------------------------------------------------------------------------------
# Plots


def plot_traces(raw: np.ndarray, filtered: np.ndarray, path: str, *, title: str = "") -> str:
    """One response's raw and filtered log-ratios (1-D arrays) to a PNG at ``path``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(raw, lw=0.7, label="raw")
    ax.plot(filtered, lw=1.6, label="filtered")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set(xlabel="token", ylabel="log-ratio", title=title or "Raw and filtered log-ratio")
    return save(fig, ax, path)


def plot_spectra(
    series: dict[str, list[np.ndarray]], path: str, *, nperseg: int | None = None
) -> str:
    """Mean power spectra (:func:`welch_spectrum`) of several sets of rows of any lengths
    (name -> list of 1-D arrays) to a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, rows in series.items():
        freq, power, segments = welch_spectrum(rows, nperseg)
        if segments:
            ax.semilogy(freq[1:], power[1:], label=f"{name} ({segments} segments)")
    ax.set(
        xlabel="frequency (cycles per token)",
        ylabel="power",
        title="Spectrum along responses (Welch)",
    )
    return save(fig, ax, path)


def plot_switch_histogram(frequencies: dict[str, np.ndarray], path: str) -> str:
    """Histograms of per-row switch frequencies (name -> ``[batch]``) to a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0.0, 1.0, 41)
    for name, freq in frequencies.items():
        ax.hist(freq[np.isfinite(freq)], bins=bins, alpha=0.6, label=name)
    ax.set(xlabel="switch frequency per response", ylabel="responses", title="Sign switches")
    return save(fig, ax, path)
