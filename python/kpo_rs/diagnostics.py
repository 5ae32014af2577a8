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

Plots (matplotlib, optional): :func:`plot_traces`, :func:`plot_spectra`,
:func:`plot_switch_histogram`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Switches",
    "low_frequency_energy",
    "low_frequency_energy_packed",
    "plot_spectra",
    "plot_switch_histogram",
    "plot_traces",
    "run_lengths",
    "run_lengths_packed",
    "token_switches",
    "token_switches_packed",
]


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


# --------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError("plots need matplotlib: pip install 'kpo-rs[demo]'") from exc
    return plt


def plot_traces(raw: np.ndarray, filtered: np.ndarray, path: str, *, title: str = "") -> str:
    """One response's raw and filtered log-ratios (1-D arrays) to a PNG at ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(raw, lw=0.7, label="raw")
    ax.plot(filtered, lw=1.6, label="filtered")
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.set(xlabel="token", ylabel="log-ratio", title=title or "Raw and filtered log-ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectra(series: dict[str, list[np.ndarray]], path: str) -> str:
    """Mean power spectra of several sets of rows (name -> list of 1-D arrays) to a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, rows in series.items():
        rows = [r for r in rows if r.size >= 8]
        if not rows:
            continue
        n = min(r.size for r in rows)
        spec = np.mean([np.abs(np.fft.rfft(r[:n] - r[:n].mean())) ** 2 for r in rows], axis=0)
        ax.semilogy(np.fft.rfftfreq(n)[1:], spec[1:], label=name)
    ax.set(xlabel="frequency (cycles per token)", ylabel="power", title="Spectrum along responses")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_switch_histogram(frequencies: dict[str, np.ndarray], path: str) -> str:
    """Histograms of per-row switch frequencies (name -> ``[batch]``) to a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(0.0, 1.0, 41)
    for name, freq in frequencies.items():
        ax.hist(freq[np.isfinite(freq)], bins=bins, alpha=0.6, label=name)
    ax.set(xlabel="switch frequency per response", ylabel="responses", title="Sign switches")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
