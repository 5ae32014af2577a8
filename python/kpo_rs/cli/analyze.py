"""``kpo analyze``: ratio diagnostics of a Parquet file of rollouts, with plots
(:func:`kpo_rs.pipeline.analyze_parquet`); on a run's rollout dumps (a folder written through
``KPO_DUMP_DIR``, or one of its shards) the premise report of :mod:`kpo_rs.run_analysis`:
statistics overall and by step, the autocorrelation, the fit, the engine mismatch, a verdict per
question and what to do."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ._common import (
    add_rollout_options,
    columns_of,
    fit_warnings,
    fitting,
    job_settings,
    jsonable,
    null_summary,
    plain_table,
    rows_listed,
    with_non_finite_hint,
)
from ._progress import Progress

__all__ = ["add_parser", "analysis_rows", "print_analysis", "run"]


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo analyze``'s options."""
    p = sub.add_parser(
        "analyze",
        help="is KPO's premise true on a run's dumps? ratio diagnostics of a Parquet file",
        description="On a folder of rollout dumps (KPO_DUMP_DIR) or one shard: the log-ratio's "
        "mean, spread and autocorrelation (to lag 32, with the white-noise band) overall and by "
        "step, the local-level fit (q, r, interval, window, data weight at the configured and "
        "the fitted settings), the engine mismatch by position, a verdict per question and the "
        "settings to try; plots with --out (ACF, spectrum, mismatch by position, data weight by "
        "length). On another Parquet file of rollouts (give its columns): switch frequency, run "
        "lengths and low-frequency energy of the raw and filtered log-ratios, ratio statistics, "
        "and PNG plots.",
    )
    p.add_argument(
        "input",
        metavar="IN",
        help="a folder of rollout dumps (KPO_DUMP_DIR), one dump shard, or a Parquet file of "
        "rollouts (then give its columns)",
    )
    p.add_argument("--out", metavar="DIR", help="folder for the PNG plots (none if omitted)")
    p.add_argument(
        "--cutoff", type=float, default=0.05, help="low-frequency cutoff, cycles/token (0.05)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--clip",
        nargs=2,
        type=float,
        metavar=("EPS_LOW", "EPS_HIGH"),
        default=(3e-4, 4e-4),
        help="the run's clip band of the filtered ratio, [1 - EPS_LOW, 1 + EPS_HIGH] "
        "(default 3e-4 4e-4, KPO-clipped's)",
    )
    add_rollout_options(p)


_LABELS = {
    "switch_frequency": "switch frequency",
    "mean_run_length": "mean run length",
    "low_frequency_energy": "low-frequency energy",
    "ratio_mean": "ratio mean",
    "ratio_std": "ratio std",
    "ratio_max": "ratio max",
    "ratio_spikes": "ratio spikes (|log r| > log 2)",
}


def analysis_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(diagnostic, raw, filtered)`` rows of :func:`print_analysis`'s table."""
    rows = [
        (_LABELS[k], f"{result['raw'][k]:.4f}", f"{result['filtered'][k]:.4f}")
        for k in result["raw"]
    ]
    rows += [
        (_LABELS[k], f"{result[k]:.4f}", "")
        for k in ("ratio_mean", "ratio_std", "ratio_max", "ratio_spikes")
    ]
    return rows


def activity_lines(result: dict[str, Any]) -> list[str]:
    """What the filter does at the file's lengths, before the spectral diagnostics."""
    a = result["activity"]
    lines = [
        f"filter at these settings: median response length {a['median_length']:g} tokens, "
        f"effective window {a['effective_window']:.4g} tokens, data weight {a['data_weight']:.2%}"
        f"; log-ratio spread (std) raw {a['raw_log_ratio_std']:.4g}, filtered "
        f"{a['filtered_log_ratio_std']:.4g}",
    ]
    if a["data_weight"] < 0.05:
        lines.append(
            "  the filter is nearly inert here: the filtered log-ratio stays near the prior mean,"
            " so a drop in switch frequency below says nothing about the data (try --fit)"
        )
    fit = result.get("fit")
    if fit is not None:
        lo, hi = fit["q_over_r_interval"]
        lines.append(
            f"fitted on {fit['rows_used']} rows: q={fit['q']:.4g} r={fit['r']:.4g} (q/r "
            f"{fit['q_over_r']:.4g}, 95% interval [{lo:.4g}, {hi:.4g}]), effective window "
            f"{fit['effective_window']:.4g} tokens, data weight {fit['data_weight']:.2%}"
            + ("; no drift detected (q = 0 fits as well)" if fit["flat"] else "")
        )
        lo_c, hi_c = fit["clip"]
        lines.append(
            f"  at the fitted settings the clip band ({lo_c:g}, {hi_c:g}) (--clip) would clip "
            f"{fit['clipped_share']:.1%} of the tokens"
            + (
                "; a band that narrow cannot follow filtered ratios that move this much: widen it "
                "to their spread (kpo analyze on the run's dumps, KPO_DUMP_DIR, suggests one)"
                if fit["clipped_share"] > 0.5
                else ""
            )
        )
    return lines


def print_analysis(result: dict[str, Any]) -> None:
    """The analysis as a table on stdout (rich on a terminal, plain text otherwise)."""
    for line in activity_lines(result):
        print(line)
    title = (
        f"{result['file']}: {result['rows']} rows "
        f"({null_summary(result['null_rows'], result['bad_rows'])}), "
        f"{result['tokens']} valid tokens"
    )
    rows = analysis_rows(result)
    rich_table = sys.stdout.isatty()
    if rich_table:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            rich_table = False
    if rich_table:
        table = Table(title=title)
        table.add_column("diagnostic")
        table.add_column("raw", justify="right")
        table.add_column("filtered", justify="right")
        for row in rows:
            table.add_row(*row)
        Console(width=max(Console().width, 100)).print(table)
    else:  # plain text for logs and pipes: no box-drawing characters
        print(plain_table(title, ("diagnostic", "raw", "filtered"), rows))
    if result["bad_rows"]:
        print(rows_listed(result["bad_rows"], "with non-finite values at valid tokens left out"))
    if result["plots"]:
        print("plots: " + ", ".join(result["plots"]))


def _fit(
    args: argparse.Namespace, columns: Any, kw: dict[str, Any], names: tuple[str, ...]
) -> dict[str, Any]:
    """``--fit``: the fitted settings and what they do (:func:`kpo_rs.pipeline.fit_parquet`)."""
    from ..pipeline import fit_parquet

    fit, used, clipped = fit_parquet(args.input, columns, fit=names, clip=tuple(args.clip), **kw)
    p = fit.params
    return {
        "q": p.q,
        "r": p.r,
        "p0": p.p0,
        "m0": p.m0,
        "fitted": list(fit.fitted),
        "rows_used": used,
        "tokens": fit.tokens,
        "log_likelihood": fit.log_likelihood,
        "converged": fit.converged,
        "q_over_r": fit.q_over_r,
        "q_over_r_interval": list(fit.q_over_r_interval),
        "effective_window": fit.effective_window,
        "data_weight": fit.data_weight,
        "flat": fit.flat,
        "clipped_share": clipped,
        "clip": list(args.clip),
        "warnings": fit_warnings(fit),
    }


def _check_clip(clip: Any) -> tuple[float, float]:
    low, high = (float(c) for c in clip)
    if not (0.0 <= low < 1.0 and high >= 0.0):
        raise ValueError(f"--clip must be EPS_LOW in [0, 1) and EPS_HIGH >= 0, got {low} {high}")
    return low, high


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo analyze``: 0, or 2 for a bad input or option (one line)."""
    from ..pipeline import PipelineError, analyze_parquet
    from ..run_analysis import RunError, is_dump

    try:
        _check_clip(args.clip)
        if args.q == "fit":
            print("kpo analyze: note: --q fit is an alias of --fit", file=sys.stderr)
        if is_dump(args.input):
            return _run_dump(args)
        names = fitting(args)
        columns = columns_of(args)
        kw = job_settings(args)
        with Progress("analyze", not args.no_progress, args.log_every) as progress:
            result = analyze_parquet(
                args.input,
                columns,
                out_dir=args.out,
                cutoff=args.cutoff,
                progress=progress,
                **kw,
            )
        if result["tokens"] == 0:
            raise PipelineError(f"{args.input}: no valid tokens to analyze")
        if names is not None:
            result["fit"] = _fit(args, columns, kw, names)
    except (PipelineError, RunError, ValueError, TypeError) as exc:
        message = with_non_finite_hint(str(exc), args.on_non_finite)
        print(f"kpo analyze: {message}", file=sys.stderr)
        return 2
    for warning in (result.get("fit") or {}).get("warnings", []):
        print(f"kpo analyze: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(jsonable(result), indent=2))
    else:
        print_analysis(result)
    return 0


# --- a run's rollout dumps -----------------------------------------------------------------


def _run_dump(args: argparse.Namespace) -> int:
    """``kpo analyze DIR`` on rollout dumps: the premise report (always with the fit)."""
    from ..run_analysis import advice, analyze_run, verdicts

    if any(getattr(args, c) for c in ("log_probs", "old_log_probs", "log_ratio", "ratio", "mask")):
        raise ValueError(
            f"{args.input} is a rollout dump: its columns are known, drop --log-probs / "
            "--old-log-probs / --log-ratio / --ratio / --mask"
        )
    if args.space != "log_ratio":
        raise ValueError("--space: a dump's report is of log-ratios (--space log_ratio)")
    kw = job_settings(args)
    plots = None if args.out is None else Path(args.out)
    if plots is not None:  # before the work, not after it
        try:
            plots.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out: cannot create the plot folder {plots}: {exc}") from exc
    with Progress("analyze", not args.no_progress, args.log_every) as progress:
        result = analyze_run(
            args.input,
            params=kw["params"],
            clip=_check_clip(args.clip),
            on_non_finite=args.on_non_finite,
            batch_size=args.batch_size,
            progress=progress,
        )
    kept = result.pop("_rows")
    result["verdicts"] = [{"question": q, "answer": a} for q, a in verdicts(result)]
    result["advice"] = advice(result)
    result["plots"] = [] if plots is None else _dump_plots(result, kept, plots, kw["params"])
    for warning in result["fit"]["warnings"]:
        print(f"kpo analyze: warning: {warning}", file=sys.stderr)
    if args.json:
        print(json.dumps(jsonable(result), indent=2))
    else:
        for line in dump_report_lines(result):
            print(line)
    return 0


def _f(value: Any, spec: str = ".4g") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def dump_report_lines(result: dict[str, Any]) -> list[str]:
    """The premise report as text lines: counts, statistics, ACF, steps, mismatch, fit,
    verdicts, what to do."""
    o, conf, fit = result["overall"], result["configured"], result["fit"]
    bad = result["bad_rows"]
    lines = [
        f"{result['path']}: {result['rows']} rows ({null_summary(0, bad)}), {result['steps']} "
        f"steps, {result['tokens']} valid tokens, median response {result['median_length']:g} "
        "tokens",
    ]
    if bad:
        lines.append(rows_listed(bad, "with non-finite values at valid tokens left out"))
    lines.append(
        f"log-ratio: mean {_f(o['log_ratio_mean'])} nats, std {_f(o['log_ratio_std'])}; "
        f"acf1 {_f(o['log_ratio_acf1'], '.3f')} acf2 {_f(o['log_ratio_acf2'], '.3f')} "
        f"acf4 {_f(o['log_ratio_acf4'], '.3f')} acf8 {_f(o['log_ratio_acf8'], '.3f')} "
        f"(white-noise band +-{result['acf_band']:.3f})"
    )
    acf = result["acf"]
    shown = ", ".join(f"{k}: {acf[k - 1]:.3f}" for k in (1, 2, 4, 8, 16, 32) if k <= len(acf))
    lines.append(f"ACF by lag: {shown}")
    rows = [
        (
            str(s["step"]),
            str(s["tokens"]),
            _f(s["log_ratio_mean"], ".3g"),
            _f(s["log_ratio_std"], ".3g"),
            _f(s["log_ratio_acf1"], ".3f"),
            _f(s["log_ratio_acf8"], ".3f"),
            _f(s["filtered_var_ratio"], ".3g"),
            _f(s.get("mismatch_acf1"), ".3f"),
        )
        for s in result["by_step"]
    ]
    header = ("step", "tokens", "mean", "std", "acf1", "acf8", "filt var", "mismatch acf1")
    lines.append(
        plain_table("by step (filt var: filtered / raw variance, configured)", header, rows)
    )
    mm = result["mismatch"]
    if mm is not None:
        lines.append(
            f"engine mismatch old_log_prob - engine_log_prob: mean {_f(mm['mismatch_mean'])}, std "
            f"{_f(mm['mismatch_std'])}, acf1 {_f(mm['mismatch_acf1'], '.3f')} (band "
            f"+-{mm['acf_band']:.3f}), {mm['tokens']} tokens"
        )
        pos_rows = [
            (
                f"{b['positions'][0]}-{'' if b['positions'][1] is None else b['positions'][1] - 1}",
                str(b["tokens"]),
                _f(b["mean"], ".3g"),
                _f(b["rms"], ".3g"),
            )
            for b in mm["by_position"]
        ]
        lines.append(
            plain_table("mismatch by position", ("positions", "tokens", "mean", "rms"), pos_rows)
        )
    lo, hi = fit["q_over_r_interval"]
    lines.append(
        f"fit on {fit['rows_used']} rows, {fit['tokens']} tokens: q={_f(fit['q'])} "
        f"r={_f(fit['r'])} (q/r {_f(fit['q_over_r'])}, 95% interval [{_f(lo)}, {_f(hi)}]), "
        f"window {_f(fit['effective_window'])} tokens"
    )
    for name, s in (("configured", conf), ("fitted", fit)):
        lines.append(
            f"  at the {name} settings (q={_f(s['q'])} r={_f(s['r'])}): data weight "
            f"{s['data_weight']:.1%}, filtered/raw variance {_f(s['filtered_var_ratio'], '.3g')},"
            f" band ({result['clip'][0]:g}, {result['clip'][1]:g}) clips {s['clipped_tokens']:.1%}"
            f" of the tokens, removing {s['clip_share_pos']:.1%} / {s['clip_share_neg']:.1%} of "
            "the positive / negative-advantage gradient"
        )
    lines.append("verdict:")
    lines.extend(f"  {v['question']} {v['answer']}" for v in result["verdicts"])
    lines.append("what to do:")
    lines.extend(f"  - {a}" for a in result["advice"])
    if result["plots"]:
        lines.append("plots: " + ", ".join(result["plots"]))
    return lines


def _dump_plots(result: dict[str, Any], kept: dict[str, Any], out: Path, params: Any) -> list[str]:
    """ACF, spectrum, mismatch by position and data weight by length, as PNGs in ``out``."""
    import numpy as np

    from .. import diagnostics
    from .._plotting import pyplot, save
    from ..params import FilterParams

    plt = pyplot()
    paths = []
    fig, ax = plt.subplots(figsize=(7, 3.5))
    lags = np.arange(1, len(result["acf"]) + 1)
    ax.bar(lags, result["acf"], width=0.6, label="log-ratio ACF")
    band = result["acf_band"]
    ax.axhspan(-band, band, color="grey", alpha=0.3, label="white-noise band (95%)")
    ax.set(xlabel="lag (valid tokens)", ylabel="autocorrelation", title="Log-ratio ACF")
    paths.append(save(fig, ax, str(out / "acf.png")))
    paths.append(diagnostics.plot_spectra({"log-ratio": kept["raw"]}, str(out / "spectrum.png")))
    mm = result["mismatch"]
    if mm is not None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [str(b["positions"][0]) for b in mm["by_position"]]
        ax.plot(labels, [b["rms"] for b in mm["by_position"]], "o-", label="rms")
        ax.plot(labels, [b["mean"] for b in mm["by_position"]], "s-", label="mean")
        ax.set(
            xlabel="position bucket (start)",
            ylabel="old_log_prob - engine_log_prob (nats)",
            title="Engine mismatch by position",
        )
        paths.append(save(fig, ax, str(out / "mismatch_by_position.png")))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    top = max(int(result["max_length"]), 2)
    grid = np.unique(np.geomspace(1, top, 60).astype(int))
    fit = result["fit"]
    for name, p in (
        ("configured", params),
        ("fitted", FilterParams(q=fit["q"], r=fit["r"], p0=fit["p0"])),
    ):
        weights = [diagnostics.mean_data_weight(int(n), params=p) for n in grid]
        ax.semilogx(grid, weights, label=f"{name} q={p.q:.3g} r={p.r:.3g}")
    ax.axvline(result["median_length"], color="grey", lw=0.8, label="median length")
    ax.set(xlabel="response length (tokens)", ylabel="mean data weight", title="Data weight")
    paths.append(save(fig, ax, str(out / "data_weight_by_length.png")))
    return [str(p) for p in paths]
