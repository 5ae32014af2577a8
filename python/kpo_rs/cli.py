"""The ``kpo`` command.

``kpo demo`` runs a small RL comparison of policy losses on CPU and writes a table, plots and
metrics; ``kpo sweep`` runs the demo over a grid of settings; ``kpo filter`` adds filtered-ratio
columns to a Parquet file of rollouts; ``kpo analyze`` prints ratio diagnostics of one and draws
plots; ``kpo bench`` measures the Rust core against numpy baselines on this machine. ``kpo`` alone
prints this help; ``kpo --version`` the version.

argparse (standard library) keeps ``import kpo_rs`` free of extra dependencies and the start-up
fast; each sub-command imports what it needs and, when a package is missing, names the extra to
install. Errors a person can fix (a missing column, a wrong type, an unreadable file) print one
line and exit 2; Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

#: The extra that brings the optional packages each sub-command imports.
EXTRAS = {"demo": "demo", "sweep": "demo", "filter": "arrow", "analyze": "arrow"}
#: Optional packages (top-level module names) a sub-command may miss.
OPTIONAL = ("torch", "rich", "matplotlib", "pyarrow")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _missing_module(exc: BaseException) -> str | None:
    """The optional package whose absence caused ``exc`` (an ImportError, possibly re-raised with
    another message), or None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ImportError) and seen.name:
            top = seen.name.split(".")[0]
            if top in OPTIONAL:
                return top
        seen = seen.__cause__ or seen.__context__
    return None


def missing_extra_message(command: str, module: str) -> str:
    """The one line printed when ``kpo command`` lacks the optional package ``module``."""
    extra = EXTRAS.get(command, "demo" if module == "torch" else "arrow")
    return (
        f"kpo {command} needs the '{extra}' extra: pip install 'kpo-rs[{extra}]' "
        f"(missing: {module})"
    )


class _Progress:
    """Rows done of a long job, called as ``progress(done, total)``: a transient rich bar when
    stderr is a terminal (and rich is installed), otherwise a line on stderr every ``every``
    seconds, so logs show progress. Nothing is shown before the first call, which the jobs make
    once the input and output are checked."""

    def __init__(
        self,
        command: str,
        enabled: bool,
        every: float,
        stream: TextIO | None = None,
        unit: str = "rows",
    ):
        self.command, self.enabled, self.every, self.unit = command, enabled, every, unit
        self.stream = sys.stderr if stream is None else stream
        self._bar: Any = None
        self._task: Any = None
        self._start = self._last = 0.0
        self._started = False

    def _start_bar(self) -> None:
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            return
        columns = (
            TextColumn(f"kpo {self.command}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(self.unit),
            TimeRemainingColumn(),
        )
        self._bar = Progress(*columns, console=Console(file=self.stream), transient=True)
        self._task = self._bar.add_task(self.command, total=None)
        self._bar.start()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self._started:
            self._started, self._start, self._last = True, now, now
            if self.stream.isatty():
                self._start_bar()
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
        elif done > 0 and now - self._last >= self.every:
            self._last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            print(
                f"kpo {self.command}: {done}/{total} {self.unit}{share}, {now - self._start:.0f} s",
                file=self.stream,
                flush=True,
            )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --------------------------------------------------------------------------------------------
# demo


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from ._demo_config import DEFAULT_LOSSES, DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a tiny policy with each loss on CPU and compare (a few minutes)",
        description="Trains a tiny causal transformer with group-relative advantages on a "
        "synthetic task with a verifiable reward, once per loss and seed, and compares the losses.",
    )
    counts = (
        ("--steps", _positive, "RL steps per run"),
        ("--seeds", _positive, "seeds per loss"),
        ("--lag", _non_negative, "rollouts come from the policy this many updates old"),
        ("--minibatches", _positive, "updates per rollout batch"),
        ("--response-len", _positive, "tokens per response"),
    )
    for flag, kind, text in counts:
        default = getattr(d, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument(
        "--losses",
        default=",".join(DEFAULT_LOSSES),
        help="comma-separated loss names from kpo_rs.loss_table "
        f"(default {','.join(DEFAULT_LOSSES)})",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument(
        "--device", default=d.device, help="torch device, e.g. cpu or cuda (default cpu)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _plain_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table as plain text (for logs and pipes: no box-drawing characters); the first column
    left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([title, line(header), *(line(r) for r in rows)])


def _run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.table import Table

    from ._demo_config import DemoConfig, split_names
    from .demo import run_demo, summary_rows, table_footnote, write_outputs

    cfg = DemoConfig(
        steps=args.steps,
        seeds=args.seeds,
        losses=split_names(args.losses),
        lag=args.lag,
        minibatches=args.minibatches,
        response_len=args.response_len,
        device=args.device,
        out=args.out,
    )
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"kpo demo: {exc}", file=sys.stderr)
        return 2
    total = len(cfg.losses) * cfg.seeds * cfg.steps
    if sys.stderr.isatty():
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("reward {task.fields[reward]:.3f}"),
            TimeRemainingColumn(),
        )
        console = Console(stderr=True)
        with Progress(*columns, console=console, disable=args.no_progress) as progress:
            task = progress.add_task("training", total=total, reward=0.0)

            def update(entry):
                progress.update(
                    task,
                    advance=1,
                    description=f"{entry.loss} seed {entry.seed}",
                    reward=entry.reward,
                )

            result = run_demo(cfg, progress=update)
    else:  # logs: a line every 10 s
        lines = _Progress("demo", not args.no_progress, 10.0, unit="steps")
        done = [0]

        def count(entry):
            done[0] += 1
            lines(done[0], total)

        result = run_demo(cfg, progress=count)
    rows = summary_rows(result)
    title = (
        f"{cfg.steps} steps x {cfg.seeds} seeds, lag {cfg.lag}, "
        f"{cfg.minibatches} updates per rollout batch"
    )
    if sys.stdout.isatty():
        table = Table(title=title, caption=table_footnote(cfg), caption_justify="left")
        for key in rows[0]:
            table.add_column(key, justify="left" if key == "loss" else "right")
        for row in rows:
            table.add_row(*row.values())
        # A table too wide for a narrow terminal is printed whole, not truncated.
        Console(width=max(Console().width, 150)).print(table)
    else:
        print(_plain_table(title, list(rows[0]), [list(r.values()) for r in rows]))
        print(textwrap.fill(table_footnote(cfg), width=100))
    paths = write_outputs(result, Path(cfg.out))
    print(
        f"wrote {len(paths)} files to {Path(cfg.out).resolve()}: "
        + ", ".join(p.name for p in paths)
    )
    return 0


# --------------------------------------------------------------------------------------------
# filter and analyze


def _add_source_and_filter_options(p: argparse.ArgumentParser) -> None:
    from .params import FilterParams

    d = FilterParams()
    src = p.add_argument_group("where the ratios come from (one of)")
    src.add_argument("--log-probs", metavar="COL", help="list<float> column of current log-probs")
    src.add_argument("--old-log-probs", metavar="COL", help="list<float> column of old log-probs")
    src.add_argument("--log-ratio", metavar="COL", help="list<float> column of log-ratios")
    src.add_argument("--ratio", metavar="COL", help="list<float> column of ratios")
    src.add_argument(
        "--mask",
        metavar="COL",
        help="optional mask column: list<bool>, or integers 0/1 (1 = valid token)",
    )
    f = p.add_argument_group("filter settings (defaults: the KPO authors', kpo_rs.FilterParams)")
    f.add_argument("--q", type=float, help=f"process-noise variance (default {d.q:g})")
    f.add_argument("--r", type=float, help=f"observation-noise variance (default {d.r:g})")
    f.add_argument("--p0", type=float, help=f"prior variance; inf = flat prior (default {d.p0:g})")
    f.add_argument("--masked", choices=("hold", "zero"), help=f"masked tokens (default {d.masked})")
    f.add_argument(
        "--space",
        choices=("log_ratio", "ratio"),
        default="log_ratio",
        help="what to filter (default log_ratio)",
    )
    p.add_argument(
        "--on-non-finite",
        choices=("error", "null"),
        default="error",
        help="a row with a NaN or infinite value at a valid token: stop with an error naming the "
        "row and column (default), or give it null outputs, go on and list such rows at the end",
    )
    p.add_argument(
        "--batch-size", type=_positive, default=4096, help="rows per record batch (default 4096)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument(
        "--log-every",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, a progress line every SECONDS (default 10)",
    )


def _columns(args: argparse.Namespace):
    from .pipeline import Columns

    given = [
        args.log_probs is not None or args.old_log_probs is not None,
        args.log_ratio,
        args.ratio,
    ]
    if sum(bool(g) for g in given) != 1 or (args.log_probs is None) != (args.old_log_probs is None):
        raise ValueError("give --log-probs with --old-log-probs, or --log-ratio, or --ratio")
    return Columns(args.log_probs, args.old_log_probs, args.log_ratio, args.ratio, args.mask)


def _job_kw(args: argparse.Namespace) -> dict[str, Any]:
    """The settings shared by ``kpo filter`` and ``kpo analyze``."""
    from .params import FilterParams

    try:
        params = FilterParams.resolve(None, q=args.q, r=args.r, p0=args.p0, masked=args.masked)
    except ValueError as exc:  # FilterParams names the field: name the option
        raise ValueError(f"--{exc}") from exc
    return {
        "params": params,
        "space": args.space,
        "on_non_finite": args.on_non_finite,
        "batch_size": args.batch_size,
    }


def _rows_listed(rows: list[int], what: str, limit: int = 20) -> str:
    """``"2 rows <what>: rows 3, 35"``, at most ``limit`` of them listed."""
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
    s = "" if len(rows) == 1 else "s"
    return f"{len(rows)} row{s} {what}: row{s} {shown}{more}"


def _run_filter(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, filter_parquet

    existed = os.path.exists(args.output)
    try:
        columns = _columns(args)
        kw = _job_kw(args)
        with _Progress("filter", not args.no_progress, args.log_every) as progress:
            stats = filter_parquet(args.input, args.output, columns, progress=progress, **kw)
    except (PipelineError, ValueError, TypeError) as exc:
        print(f"kpo filter: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        left = "left unchanged" if existed else "not written"
        print(f"kpo filter: interrupted; {args.output} was {left}", file=sys.stderr)
        return 130
    print(
        f"wrote {args.output}: {stats.rows} rows ({stats.null_rows} null), {stats.tokens} valid "
        f"tokens in {stats.seconds:.2f} s ({stats.tokens_per_second:.3e} tokens/s)"
    )
    if stats.bad_rows:
        verb = "has" if len(stats.bad_rows) == 1 else "have"
        what = f"with non-finite values at valid tokens {verb} null outputs"
        print(_rows_listed(stats.bad_rows, what))
    return 0


_LABELS = {
    "switch_frequency": "switch frequency",
    "mean_run_length": "mean run length",
    "low_frequency_energy": "low-frequency energy",
    "ratio_mean": "ratio mean",
    "ratio_std": "ratio std",
    "ratio_max": "ratio max",
    "ratio_spikes": "ratio spikes (|log r| > log 2)",
}


def _jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _analysis_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        (_LABELS[k], f"{result['raw'][k]:.4f}", f"{result['filtered'][k]:.4f}")
        for k in result["raw"]
    ]
    rows += [
        (_LABELS[k], f"{result[k]:.4f}", "")
        for k in ("ratio_mean", "ratio_std", "ratio_max", "ratio_spikes")
    ]
    return rows


def _print_analysis(result: dict[str, Any]) -> None:
    title = (
        f"{result['file']}: {result['rows']} rows ({result['null_rows']} null), "
        f"{result['tokens']} valid tokens"
    )
    rows = _analysis_rows(result)
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
        print(_plain_table(title, ("diagnostic", "raw", "filtered"), rows))
    if result["bad_rows"]:
        print(_rows_listed(result["bad_rows"], "with non-finite values at valid tokens left out"))
    if result["plots"]:
        print("plots: " + ", ".join(result["plots"]))


def _run_analyze(args: argparse.Namespace) -> int:
    from .pipeline import PipelineError, analyze_parquet

    try:
        columns = _columns(args)
        kw = _job_kw(args)
        with _Progress("analyze", not args.no_progress, args.log_every) as progress:
            result = analyze_parquet(
                args.input,
                columns,
                out_dir=args.out,
                cutoff=args.cutoff,
                progress=progress,
                **kw,
            )
    except (PipelineError, ValueError, TypeError) as exc:
        print(f"kpo analyze: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_jsonable(result), indent=2))
    else:
        _print_analysis(result)
    return 0


# --------------------------------------------------------------------------------------------
# bench and sweep


class _DeprecatedTime(argparse.Action):
    """``--time``: the old name of ``--tokens-per-row``; still works, with a warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print("kpo bench: --time is deprecated; use --tokens-per-row", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput of the Rust core on this machine against numpy baselines",
        description="Tokens per second of the filter and its adjoint next to a numpy copy and a "
        "numpy loop over time, measured in the same run.",
    )
    p.add_argument("--batch", type=_positive, default=64, help="rows (default 64)")
    p.add_argument(
        "--tokens-per-row",
        type=_positive,
        default=4096,
        metavar="N",
        help="tokens in each row (default 4096)",
    )
    p.add_argument(
        "--time",
        type=_positive,
        dest="tokens_per_row",
        action=_DeprecatedTime,
        help=argparse.SUPPRESS,
    )
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")


def _add_sweep(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo sweep``: its options come from :mod:`kpo_rs.sweep`, imported only when the command
    is ``sweep`` (``full``), so the other commands never import it."""
    p = sub.add_parser(
        "sweep",
        help="run the demo over a grid of settings and seeds, resumable, with a report",
        add_help=full,
    )
    if full:
        from . import sweep

        sweep.add_arguments(p)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``kpo`` parser; ``command`` is the sub-command about to run (its optional imports are
    made only then)."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="kpo",
        description="kpo-rs: causal Kalman filtering of importance ratios for KPO policy "
        "optimization.",
    )
    parser.add_argument("--version", action="version", version=f"kpo-rs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    _add_sweep(sub, full=command == "sweep")
    p = sub.add_parser(
        "filter",
        help="add filtered-ratio columns to a Parquet file of rollouts",
        description="Reads IN in record batches (bounded memory) and writes OUT with every input "
        "column plus kpo_filtered_log_ratio (nats) and kpo_filtered_ratio (its exp, clamped at "
        "exp(10) as the KPO loss clamps it): one list per row, float32 unless a source column "
        "is float64. OUT is written to a temporary file and renamed only when complete: a "
        "failed or interrupted run leaves an existing OUT unchanged. OUT may not be IN.",
    )
    p.add_argument("input", metavar="IN", help="input Parquet file")
    p.add_argument("output", metavar="OUT", help="output Parquet file")
    _add_source_and_filter_options(p)
    p = sub.add_parser(
        "analyze",
        help="ratio diagnostics of a Parquet file of rollouts, with plots",
        description="Switch frequency, run lengths and low-frequency energy of the raw and the "
        "filtered log-ratios, ratio statistics over the valid tokens, and PNG plots.",
    )
    p.add_argument("input", metavar="IN", help="input Parquet file")
    p.add_argument("--out", metavar="DIR", help="folder for the PNG plots (none if omitted)")
    p.add_argument(
        "--cutoff", type=float, default=0.05, help="low-frequency cutoff, cycles/token (0.05)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_source_and_filter_options(p)
    _add_bench(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _run_demo(args)
    if args.command == "sweep":
        from . import sweep

        return sweep.run_cli(args)
    if args.command == "filter":
        return _run_filter(args)
    if args.command == "analyze":
        return _run_analyze(args)
    from .bench import report, run  # bench

    n, length = args.batch, args.tokens_per_row
    print(report(run(n, length, args.dtype), n, length, args.dtype))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``kpo`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except ImportError as exc:
        module = _missing_module(exc)
        if module is not None:
            print(missing_extra_message(command or "", module), file=sys.stderr)
        elif (exc.name or "").startswith("kpo_rs."):
            print(f"kpo {command}: not available in this installation ({exc})", file=sys.stderr)
        else:
            raise
        return 2
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _run(args)
    except ImportError as exc:
        module = _missing_module(exc)
        if module is None:
            raise
        print(missing_extra_message(args.command, module), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
