"""``kpo analyze DIR``: the premise of KPO judged on a run's rollout dumps (:mod:`kpo_rs.dump`):
:func:`analyze_run`, :func:`verdicts`, :func:`advice`.

Reads a folder of shards (or one shard) as one dataset (``pyarrow.dataset``, streamed in record
batches: memory is bounded by the batch and the fit's sample, not by the run) and reports, overall
and by step, the statistics the losses log (:mod:`kpo_rs.premise`, the same definitions: pooled
over rows, centred on the mean, consecutive *valid* tokens as neighbours), the autocorrelation to
lag :data:`MAX_LAG` with its white-noise band ``+-1.96 / sqrt(n)``, the local-level fit
(:func:`kpo_rs.fit.fit_filter` on a sample of at most ``fit_tokens`` valid tokens, whole rows in
file order), the data weight, filtered-variance ratio and clip shares at the configured and the
fitted settings, and the engine mismatch ``old_log_prob - engine_log_prob`` by position bucket.

Requires pyarrow (``pip install 'kpo-rs[arrow]'``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from . import diagnostics
from .arrow import batch_log_ratios, check_on_non_finite, filter_log_ratio_and_ratio
from .fit import FilterFit, fit_filter
from .params import FilterParams
from .space import LOG_RATIO_CLAMP

__all__ = [
    "BUCKETS",
    "DUMP_COLUMNS",
    "INERT_DATA_WEIGHT",
    "MAX_LAG",
    "STEP_LAGS",
    "RunError",
    "advice",
    "analyze_run",
    "is_dump",
    "verdicts",
]

#: The autocorrelation is reported to this lag (overall).
MAX_LAG = 32
#: The lags reported by step (as the losses log them).
STEP_LAGS = (1, 2, 4, 8)
#: Position buckets of the mismatch (start of each; the last is open).
BUCKETS = (0, 64, 128, 256, 512, 1024, 2048, 4096)
#: Below this mean data weight the filter is judged inert (the losses' warning threshold).
INERT_DATA_WEIGHT = 0.05
#: The dump's columns this analysis reads (``engine_log_prob`` where present).
DUMP_COLUMNS = ("step", "log_prob", "old_log_prob", "mask", "advantages")
#: The share of tokens the suggested clip band clips at the suggested settings (both tails).
TARGET_CLIP_SHARE = 0.1

Progress = Callable[[int, int], None]


class RunError(Exception):
    """A problem a person can fix (no such folder, not a dump, a bad row); one line."""


def is_dump(path: str | Path) -> bool:
    """Whether ``path`` is a folder (read as a folder of dump shards) or a Parquet file written by
    :class:`kpo_rs.dump.RolloutDumper` (its metadata holds the ``kpo_rs.dump`` record)."""
    p = Path(path)
    if p.is_dir():
        return True
    if not p.is_file():
        return False
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(p).metadata or {}
    except (OSError, pa.ArrowException):
        return False
    return b"kpo_rs.dump" in meta


@dataclass
class _Series:
    """Streaming sums of one series (packed rows of valid tokens): moments and lag products,
    from which the pooled, mean-centred autocorrelation follows exactly."""

    lags: tuple[int, ...]
    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    row_means: list[float] = field(default_factory=list)
    pairs: np.ndarray = field(init=False)
    sab: np.ndarray = field(init=False)
    sa: np.ndarray = field(init=False)
    sb: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        k = len(self.lags)
        self.pairs, self.sab = np.zeros(k), np.zeros(k)
        self.sa, self.sb = np.zeros(k), np.zeros(k)

    def add(self, v: np.ndarray, row: np.ndarray, cu: np.ndarray) -> None:
        """``v`` float64 valid tokens of whole rows, ``row`` their row ids, ``cu`` offsets.

        The lag sums as in :func:`kpo_rs.premise.series_statistics`: the rows laid out with
        ``max(lags)`` zeros after each, so the flat buffer's autocorrelation (one FFT) at each lag
        sums its pairs and none across rows; the pairs' first and second members' sums from the
        sums of each row's first and last tokens (one ``bincount`` each)."""
        self.n += v.size
        self.s1 += float(v.sum())
        self.s2 += float(v @ v)
        lengths = np.diff(cu)
        nonempty = lengths > 0
        sums = np.add.reduceat(v, cu[:-1][nonempty]) if v.size else np.zeros(0)
        self.row_means.extend((sums / lengths[nonempty]).tolist())
        if not v.size:
            return
        top = max(self.lags)
        pos = np.arange(v.size) - np.repeat(cu[:-1], lengths)  # index within the row
        rev = np.repeat(lengths, lengths) - 1 - pos  # valid tokens after it in the row
        buffer = np.zeros(v.size + (top + 1) * lengths.size)
        buffer[np.arange(v.size) + (top + 1) * row] = v
        head = np.bincount(np.minimum(pos, top), weights=v, minlength=top + 1)[:top].cumsum()
        tail = np.bincount(np.minimum(rev, top), weights=v, minlength=top + 1)[:top].cumsum()
        total = float(v.sum())
        # every lag's products at once: the buffer's autocorrelation by FFT (float64; its error
        # is about 1e-16 log(n) of sum v^2, far below the statistics' own noise)
        size = 1 << int(buffer.size + top).bit_length()
        spectrum = np.fft.rfft(buffer, size)
        products = np.fft.irfft(spectrum * spectrum.conj(), size)[: top + 1]
        for i, lag in enumerate(self.lags):
            self.pairs[i] += float(np.maximum(lengths - lag, 0).sum())
            self.sab[i] += float(products[lag])
            self.sa[i] += total - float(tail[lag - 1])  # tokens with lag more after them
            self.sb[i] += total - float(head[lag - 1])  # tokens with lag more before them

    @property
    def mean(self) -> float:
        return self.s1 / self.n if self.n else math.nan

    @property
    def var(self) -> float:
        return max(self.s2 / self.n - self.mean**2, 0.0) if self.n else math.nan

    def acf(self) -> np.ndarray:
        """The pooled autocorrelation at each lag (0 with no pair or no spread)."""
        m, var = self.mean, self.var
        out = np.zeros(len(self.lags))
        if not self.n or not var > 0:
            return out
        ok = self.pairs > 0
        cov = (self.sab - m * (self.sa + self.sb) + m * m * self.pairs)[ok] / self.pairs[ok]
        out[ok] = cov / var
        return out

    def offset_t(self) -> float:
        """The mean of the row means over its standard error (rows as independent units)."""
        means = np.asarray(self.row_means)
        if means.size < 2:
            return math.nan
        se = means.std(ddof=1) / math.sqrt(means.size)
        return float(means.mean() / se) if se > 0 else math.inf

    def summary(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}_mean": self.mean, f"{prefix}_std": math.sqrt(self.var)}
        acf = self.acf()
        for lag, value in zip(self.lags, acf):
            if lag in STEP_LAGS:
                out[f"{prefix}_acf{lag}"] = float(value)
        return out


@dataclass
class _Filtered:
    """Sums for the filtered log-ratio's variance and the clip's removed-gradient shares."""

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0
    removed: np.ndarray = field(default_factory=lambda: np.zeros(2))
    total: np.ndarray = field(default_factory=lambda: np.zeros(2))
    clipped_tokens: int = 0

    def add(self, x: np.ndarray, adv: np.ndarray, clip: tuple[float, float]) -> None:
        self.n += x.size
        self.s1 += float(x.sum())
        self.s2 += float(x @ x)
        rt = np.exp(np.minimum(x, LOG_RATIO_CLAMP))
        high, low = rt > 1.0 + clip[1], rt < 1.0 - clip[0]
        self.clipped_tokens += int((high | low).sum())
        g = np.abs(adv * rt)
        for i, (sign, active) in enumerate(((adv > 0, high), (adv < 0, low))):
            self.total[i] += float(g[sign].sum())
            self.removed[i] += float(g[sign & active].sum())

    def summary(self, raw_var: float) -> dict[str, float]:
        var = max(self.s2 / self.n - (self.s1 / self.n) ** 2, 0.0) if self.n else math.nan
        shares = np.where(self.total > 0, self.removed / np.maximum(self.total, 1e-300), 0.0)
        return {
            "filtered_var_ratio": var / raw_var if raw_var > 0 else math.nan,
            "clip_share_pos": float(shares[0]),
            "clip_share_neg": float(shares[1]),
            "clipped_tokens": self.clipped_tokens / self.n if self.n else math.nan,
        }


def _valid_rows(
    z: np.ndarray, cu: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(values, row ids, offsets, positions)`` of the valid tokens, float64."""
    if valid is None:
        valid = np.ones(z.size, dtype=bool)
    counts = np.add.reduceat(valid.astype(np.int64), cu[:-1]) if z.size else np.zeros(0, int)
    counts = np.where(np.diff(cu) > 0, counts, 0)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = np.repeat(np.arange(counts.size), counts)
    positions = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
    return z[valid].astype(np.float64), rows, offsets, positions


def _dataset(path: str | Path) -> pads.Dataset:
    p = Path(path)
    if not p.exists():
        raise RunError(f"cannot read {path}: no such file or folder")
    try:
        ds = pads.dataset(str(p), format="parquet", exclude_invalid_files=True)
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in DUMP_COLUMNS if c not in ds.schema.names]
    if missing:
        raise RunError(
            f"{path} is not a rollout dump (kpo_rs.dump): no column {missing[0]!r}; its "
            f"columns: {ds.schema.names}"
        )
    return ds


def _row_error(exc: Exception, path: str | Path, first_row: int) -> RunError:
    shifted = getattr(exc, "shifted", None)
    text = str(shifted(first_row) if shifted is not None else exc)
    hint = ""
    if "non-finite" in text:
        hint = " (--on-non-finite null leaves such rows out and lists them)"
    return RunError(f"{path}: {text}{hint}")


def analyze_run(
    path: str | Path,
    *,
    params: FilterParams | None = None,
    clip: tuple[float, float] = (3e-4, 4e-4),
    on_non_finite: str = "error",
    batch_size: int = 4096,
    fit_tokens: int = 1 << 22,
    plot_rows: int = 64,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The premise statistics of a run's dumps (module documentation).

    Args:
        path: a folder of shards or one shard.
        params: the configured filter settings (default :class:`FilterParams`).
        clip: the configured clip band ``(eps_low, eps_high)`` (KPO-clipped's by default).
        on_non_finite: ``"error"`` (stop at the first non-finite value, naming the row) or
            ``"null"`` (leave such rows out: counted in ``bad_rows``, not in the statistics or
            the fit).
        batch_size: rows per record batch.
        fit_tokens: the most valid tokens the fit's sample holds (whole rows, in file order).
        plot_rows: rows kept for the spectrum plot.
        progress: called as ``progress(rows done, rows in total)``.

    Returns:
        A dict (JSON-able but for NaN): ``rows``, ``bad_rows``, ``tokens``, ``steps``,
        ``median_length``, ``overall`` (statistics), ``by_step`` (list of dicts), ``acf`` and
        ``acf_band``, ``mismatch`` (None without engine log-probs; else statistics and
        ``by_position``), ``configured`` and ``fit`` (settings and what they do), and
        ``_rows`` (the kept rows, for plots; not JSON).
    """
    p = FilterParams() if params is None else params
    check_on_non_finite(on_non_finite)
    ds = _dataset(path)
    engine = "engine_log_prob" in ds.schema.names
    columns = [*DUMP_COLUMNS, *(["engine_log_prob"] if engine else [])]
    total = ds.count_rows()
    lags = tuple(range(1, MAX_LAG + 1))
    overall, filtered = _Series(lags), _Filtered()
    mismatch = _Series((1, 2, 4, 8))
    steps: dict[int, tuple[_Series, _Filtered, _Series]] = {}
    bucket_sums = np.zeros((len(BUCKETS), 3))  # n, sum d, sum d^2
    sample: list[np.ndarray] = []
    sample_adv: list[np.ndarray] = []
    sample_len: list[int] = []
    kept = 0
    sample_full = False
    lengths: list[np.ndarray] = []
    plot: list[np.ndarray] = []
    rows = 0
    bad_rows: list[int] = []
    engine_rows = 0
    if progress is not None:
        progress(0, total)
    for batch in ds.to_batches(columns=columns, batch_size=batch_size):
        try:
            lr = batch_log_ratios(
                batch,
                log_probs="log_prob",
                old_log_probs="old_log_prob",
                log_ratio=None,
                ratio=None,
                mask="mask",
            )
            dropped = lr.settle_non_finite(on_non_finite)
            adv_lr = batch_log_ratios(
                batch,
                log_probs=None,
                old_log_probs=None,
                log_ratio="advantages",
                ratio=None,
                mask=None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _row_error(exc, path, rows) from exc
        bad_rows.extend((dropped + rows).tolist())
        z, row_id, cu, _ = _valid_rows(lr.z, lr.cu, lr.valid)
        valid = lr.valid if lr.valid is not None else np.ones(lr.z.size, dtype=bool)
        adv = np.nan_to_num(adv_lr.z.astype(np.float64))[valid] if adv_lr.z.size else z * 0
        x_all, _ = filter_log_ratio_and_ratio(lr.z, lr.cu, lr.valid, p, "log_ratio")
        x = x_all[valid].astype(np.float64)
        step_col = np.asarray(batch.column("step").to_numpy(zero_copy_only=False), dtype=np.int64)
        overall.add(z, row_id, cu)
        filtered.add(x, adv, clip)
        row_len = np.diff(cu)
        lengths.append(row_len)
        d = None
        if engine:
            try:
                em = batch_log_ratios(
                    batch,
                    log_probs="old_log_prob",
                    old_log_probs="engine_log_prob",
                    log_ratio=None,
                    ratio=None,
                    mask="mask",
                )
                em.settle_non_finite("null")
                em.drop_rows(dropped)
            except (KeyError, TypeError, ValueError) as exc:
                raise _row_error(exc, path, rows) from exc
            if em.null_rows is None or not em.null_rows.all():
                d, d_row, d_cu, d_pos = _valid_rows(em.z, em.cu, em.valid)
                engine_rows += int(np.sum(np.diff(d_cu) > 0))
                mismatch.add(d, d_row, d_cu)
                which = np.searchsorted(BUCKETS, d_pos, side="right") - 1
                np.add.at(bucket_sums, which, np.stack([np.ones_like(d), d, d * d], axis=1))
        token_step = step_col[row_id]  # a shard holds one step: usually one pass below
        d_step = None if d is None else step_col[d_row]
        for step in np.unique(step_col):
            rows_here = np.flatnonzero(step_col == step)
            sel_tokens = token_step == step
            sub_cu = np.concatenate([[0], np.cumsum(row_len[rows_here])])
            entry = steps.setdefault(
                int(step), (_Series(STEP_LAGS), _Filtered(), _Series(STEP_LAGS))
            )
            entry[0].add(z[sel_tokens], row_id[sel_tokens], sub_cu)
            entry[1].add(x[sel_tokens], adv[sel_tokens], clip)
            if d is not None and d_step is not None:
                d_sel = d_step == step
                entry[2].add(
                    d[d_sel],
                    d_row[d_sel],
                    np.concatenate([[0], np.cumsum(np.diff(d_cu)[rows_here])]),
                )
        for r in range(row_len.size):
            if sample_full and len(plot) >= plot_rows:
                break
            n = int(row_len[r])
            if n == 0:
                continue
            seg = z[cu[r] : cu[r + 1]]
            if not sample_full and kept + n <= fit_tokens:
                sample.append(seg)
                sample_adv.append(adv[cu[r] : cu[r + 1]])
                sample_len.append(n)
                kept += n
            else:
                sample_full = True  # whole rows in file order: the first that does not fit ends it
            if len(plot) < plot_rows:
                plot.append(seg)
        rows += batch.num_rows
        if progress is not None:
            progress(rows, total)
    if overall.n == 0:
        raise RunError(f"{path}: no valid tokens to analyze")
    all_lengths = np.concatenate(lengths)
    all_lengths = all_lengths[all_lengths > 0]
    median = float(np.median(all_lengths))
    result: dict[str, Any] = {
        "path": str(path),
        "rows": rows,
        "bad_rows": bad_rows,
        "tokens": overall.n,
        "steps": len(steps),
        "median_length": median,
        "max_length": int(all_lengths.max()),
        "clip": list(clip),
    }
    result["overall"] = {
        **overall.summary("log_ratio"),
        **filtered.summary(overall.var),
        "offset_t": overall.offset_t(),
    }
    result["acf"] = overall.acf().tolist()
    result["acf_band"] = 1.96 / math.sqrt(overall.n)
    result["by_step"] = [
        {
            "step": s,
            "tokens": entry[0].n,
            **entry[0].summary("log_ratio"),
            **entry[1].summary(entry[0].var),
            **(entry[2].summary("mismatch") if entry[2].n else {}),
        }
        for s, entry in sorted(steps.items())
    ]
    result["mismatch"] = None
    if mismatch.n:
        by_pos = []
        for i, start in enumerate(BUCKETS):
            n, s1, s2 = bucket_sums[i]
            if n:
                m = s1 / n
                end = BUCKETS[i + 1] if i + 1 < len(BUCKETS) else None
                by_pos.append(
                    {
                        "positions": [start, end],
                        "tokens": int(n),
                        "mean": m,
                        "std": math.sqrt(max(s2 / n - m * m, 0.0)),
                        "rms": math.sqrt(s2 / n),
                    }
                )
        result["mismatch"] = {
            **mismatch.summary("mismatch"),
            "rows": engine_rows,
            "tokens": mismatch.n,
            "acf_band": 1.96 / math.sqrt(mismatch.n),
            "by_position": by_pos,
        }
    flat = np.concatenate(sample)
    offsets = np.concatenate([[0], np.cumsum(sample_len)]).astype(np.int64)
    adv_flat = np.concatenate(sample_adv)
    result["configured"] = _settings_record(p, median, filtered.summary(overall.var))
    fit = fit_filter(flat, cu_seqlens=offsets, fit=("q", "r"), params=p.replace(m0=0.0))
    at_fit = _Filtered()
    x_fit, _ = filter_log_ratio_and_ratio(flat, offsets, None, fit.params, "log_ratio")
    at_fit.add(x_fit.astype(np.float64), adv_flat, clip)
    result["fit"] = {
        **_settings_record(fit.params, median, at_fit.summary(float(np.var(flat)))),
        **_fit_record(fit, len(sample_len)),
        "suggested_clip": _suggested_band(x_fit),
    }
    result["_rows"] = {"raw": plot, "lengths": all_lengths}
    return result


def _settings_record(p: FilterParams, median: float, filt: dict[str, float]) -> dict[str, Any]:
    return {
        "q": p.q,
        "r": p.r,
        "p0": p.p0,
        "effective_window": diagnostics.effective_window(p),
        "data_weight": diagnostics.mean_data_weight(round(median), params=p),
        **filt,
    }


def _fit_record(fit: FilterFit, rows: int) -> dict[str, Any]:
    lo, hi = fit.q_over_r_interval
    warnings_: list[str] = []
    if fit.tokens < 1000:
        warnings_.append(
            f"fitted on {fit.tokens} tokens only: q and r are poorly determined (the interval "
            "says how poorly); dump more rows (KPO_DUMP_ROWS) or more steps"
        )
    if not fit.converged:
        warnings_.append("the fit's search did not converge inside its range")
    return {
        "rows_used": rows,
        "tokens": fit.tokens,
        "q_over_r": fit.q_over_r,
        "q_over_r_interval": [lo, hi],
        "flat": fit.flat,
        "converged": fit.converged,
        "log_likelihood": fit.log_likelihood,
        "warnings": warnings_,
    }


def _suggested_band(x: np.ndarray) -> list[float]:
    """``[eps_low, eps_high]`` clipping the ``TARGET_CLIP_SHARE / 2`` tails of the filtered
    ratio each side (at least 1e-6 each)."""
    rt = np.exp(np.minimum(x.astype(np.float64), LOG_RATIO_CLAMP))
    low, high = np.quantile(rt, [TARGET_CLIP_SHARE / 2, 1 - TARGET_CLIP_SHARE / 2])
    return [max(1.0 - float(low), 1e-6), max(float(high) - 1.0, 1e-6)]


def _g(v: float) -> str:
    return f"{v:.3g}"


def verdicts(result: dict[str, Any]) -> list[tuple[str, str]]:
    """One ``(question, answer)`` per question: slow component, offset, would the configured
    filter act, is the configured clip one-sided, mismatch white or correlated."""
    o, fit, conf = result["overall"], result["fit"], result["configured"]
    band = result["acf_band"]
    lo, hi = fit["q_over_r_interval"]
    acf1 = o["log_ratio_acf1"]
    if fit["flat"]:
        slow = (
            f"no: q = 0 fits as well (q/r 95% interval [{_g(lo)}, {_g(hi)}] reaches 0); "
            f"acf1 {acf1:.3f} (white-noise band +-{band:.3f})"
        )
    else:
        slow = (
            f"yes: q/r = {_g(fit['q_over_r'])} (95% interval [{_g(lo)}, {_g(hi)}], above 0), a "
            f"window of {_g(fit['effective_window'])} tokens; acf1 {acf1:.3f} (band +-{band:.3f})"
        )
    t = o["offset_t"]
    mean = o["log_ratio_mean"]
    if math.isfinite(t) and abs(t) > 1.96:
        offset = (
            f"yes: mean log-ratio {mean:.3g} nats ({abs(t):.1f} standard errors over the row "
            f"means): a log-space filter keeps it, its ratio sits near {math.exp(mean):.5g}"
        )
    else:
        offset = f"no: mean log-ratio {mean:.3g} nats is within 1.96 standard errors of 0"
    w = conf["data_weight"]
    act = (
        f"{'yes' if w >= INERT_DATA_WEIGHT else 'no (nearly inert)'}: at q={_g(conf['q'])} "
        f"r={_g(conf['r'])} the data weight at the median length {result['median_length']:g} is "
        f"{w:.1%} (window {_g(conf['effective_window'])} tokens)"
    )
    mm = result["mismatch"]
    if mm is None:
        mismatch = "unknown: the dumps hold no engine log-probs"
    else:
        a1, mband = mm["mismatch_acf1"], mm["acf_band"]
        kind = "correlated" if abs(a1) > mband else "white"
        mismatch = (
            f"{kind}: acf1 {a1:.3f} (band +-{mband:.3f}); mean {mm['mismatch_mean']:.3g}, std "
            f"{mm['mismatch_std']:.3g} nats over {mm['tokens']} tokens"
        )
        buckets = mm["by_position"]
        if len(buckets) > 1:
            first, last = buckets[0], buckets[-1]
            change = last["rms"] / first["rms"] if first["rms"] > 0 else math.nan
            mismatch += (
                f"; rms {first['rms']:.3g} at positions {first['positions'][0]}-"
                f"{first['positions'][1] - 1}, {last['rms']:.3g} from {last['positions'][0]} on "
                f"(x{change:.2f} along the response)"
            )
    return [
        ("slow component?", slow),
        ("offset?", offset),
        ("would the configured filter act?", act),
        ("is the configured clip one-sided?", _one_sided(conf, result["clip"])),
        ("engine mismatch white or correlated?", mismatch),
    ]


#: A clip is called one-sided when it removes at least this many times more of one advantage
#: sign's gradient than of the other's, and at least :data:`ONE_SIDED_MIN` of it.
ONE_SIDED_RATIO = 5.0
ONE_SIDED_MIN = 0.05


def _one_sided(conf: dict[str, Any], clip: Sequence[float]) -> str:
    """The verdict on the configured clip: does it remove the gradient of one advantage sign
    only (the mask the project's toy found winning, docs/results.md), of both, or of neither?"""
    pos, neg = conf["clip_share_pos"], conf["clip_share_neg"]
    shares = (
        f"at the configured settings the band ({clip[0]:g}, {clip[1]:g}) removes {neg:.1%} of "
        f"the negative-advantage and {pos:.1%} of the positive-advantage gradient"
    )
    big, small = max(pos, neg), min(pos, neg)
    if big >= ONE_SIDED_MIN and big >= ONE_SIDED_RATIO * small:
        sign = "negative" if neg > pos else "positive"
        return (
            f"yes: {shares}: a mask of {sign}-advantage tokens, switched by the log-ratio's "
            f"offset more than by its drift. On the project's toy that mask, not denoising, is "
            f"what helped (docs/results.md): compare with GRPO's own clip before crediting the "
            f"filter"
        )
    if big < ONE_SIDED_MIN:
        return f"no, it barely binds: {shares}"
    return f"no, both signs: {shares}"


def advice(result: dict[str, Any]) -> list[str]:
    """What to do: q, r and the clip band to try for the run's response lengths, each with its
    reason."""
    fit, conf = result["fit"], result["configured"]
    median = result["median_length"]
    hi_q = fit["q_over_r_interval"][1]
    lines = []
    if fit["flat"]:
        q = hi_q * fit["r"] if math.isfinite(hi_q) and hi_q > 0 else conf["q"]
        lines.append(
            f"q={_g(q)} r={_g(fit['r'])}: the data show no drift (q = 0 fits as well), so the "
            f"filter can only average; q is the largest the data allow (the interval's upper "
            f"end), r the fitted noise. KPO then mostly averages the row's log-ratio: expect "
            f"little from it on this run"
        )
    else:
        lines.append(
            f"q={_g(fit['q'])} r={_g(fit['r'])}: the maximum-likelihood fit on "
            f"{fit['tokens']} tokens; window {_g(fit['effective_window'])} tokens against a "
            f"median response of {median:g}, data weight {fit['data_weight']:.1%} (configured: "
            f"{conf['data_weight']:.1%}). Train with them (KPO_Q={_g(fit['q'])} "
            f"KPO_R={_g(fit['r'])}) or let the loss refit online (KPO_Q=fit)"
        )
    lo, hi = result["clip"]
    band = fit["suggested_clip"]
    lines.append(
        f"clip band ({_g(band[0])}, {_g(band[1])}): at the suggested settings the configured band "
        f"({lo:g}, {hi:g}) would clip {fit['clipped_tokens']:.1%} of the tokens (removing "
        f"{fit['clip_share_pos']:.1%} of the positive-advantage and {fit['clip_share_neg']:.1%} "
        f"of the negative-advantage gradient; {conf['clipped_tokens']:.1%} at the configured "
        f"settings); this band clips the {TARGET_CLIP_SHARE / 2:.0%} tails of the filtered "
        f"ratio on each side (verl: actor.clip_ratio_low={_g(band[0])} "
        f"actor.clip_ratio_high={_g(band[1])}; TRL: kpo_epsilon_low / kpo_epsilon_high)"
    )
    mm = result["mismatch"]
    if mm is not None and abs(mm["mismatch_acf1"]) > mm["acf_band"]:
        lines.append(
            "the engine mismatch is correlated along the response: part of what the filter "
            "tracks may be the engine's, not the policy's; compare the mismatch's std with the "
            "log-ratio's and consider a rollout correction (TIS) alongside KPO"
        )
    for w in fit["warnings"]:
        lines.append(w)
    return lines
