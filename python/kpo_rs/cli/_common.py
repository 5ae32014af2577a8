"""What the ``kpo`` sub-commands share: argparse value types, the missing-extra message, plain
text tables, and the options of the Parquet jobs (``kpo filter`` and ``kpo analyze``).

A private module meant for sharing within :mod:`kpo_rs.cli`; it imports nothing optional.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = [
    "EXTRAS",
    "OPTIONAL",
    "add_rollout_options",
    "columns_of",
    "fit_warnings",
    "fitting",
    "job_settings",
    "jsonable",
    "missing_extra_message",
    "missing_module",
    "non_negative",
    "null_summary",
    "plain_table",
    "positive",
    "rows_listed",
    "seconds",
    "with_non_finite_hint",
]

#: The extra that brings the optional packages each sub-command imports (``kpo bench`` needs
#: none: numpy only).
EXTRAS = {"demo": "demo", "sweep": "demo", "filter": "arrow", "analyze": "arrow", "doctor": "torch"}


#: Optional packages (top-level module names) a sub-command may miss.
OPTIONAL = ("torch", "rich", "matplotlib", "pyarrow", "hypothesis")


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def missing_module(exc: BaseException) -> str | None:
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


def _importable(module: str) -> bool:
    """Whether top-level ``module`` can be imported (found on the path, not blocked in
    ``sys.modules``)."""
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


#: The packages (top-level module names) of each extra a sub-command needs, as pyproject.toml's
#: optional dependencies (tests/test_extras.py holds the two together).
EXTRA_MODULES = {
    "torch": ("torch",),
    "demo": ("torch", "matplotlib", "rich"),
    "arrow": ("pyarrow", "rich", "matplotlib"),
    "testing": ("hypothesis",),
}


def missing_extra_message(command: str, module: str) -> str:
    """The one line printed when ``kpo command`` lacks the optional package ``module``: the
    command's extra (or, if ``module`` is not in it, the first extra that has it), naming every
    package of that extra that is missing, not only the first one an import met."""
    extra = EXTRAS.get(command, "demo" if module == "torch" else "arrow")
    if module not in EXTRA_MODULES.get(extra, (module,)):
        extra = next((e for e, mods in EXTRA_MODULES.items() if module in mods), extra)
    absent = [m for m in EXTRA_MODULES.get(extra, ()) if not _importable(m)]
    names = [module, *(m for m in absent if m != module)]
    return (
        f"kpo {command} needs the '{extra}' extra: pip install 'kpo-rs[{extra}]' "
        f"(missing: {', '.join(names)})"
    )


def plain_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table as plain text (for logs and pipes: no box-drawing characters); the first column
    left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([title, line(header), *(line(r) for r in rows)])


def add_rollout_options(p: argparse.ArgumentParser) -> None:
    from ..params import FilterParams

    d = FilterParams()
    src = p.add_argument_group("where the ratios come from (one of)")
    src.add_argument("--log-probs", metavar="COL", help="list<float> column of current log-probs")
    src.add_argument("--old-log-probs", metavar="COL", help="list<float> column of old log-probs")
    src.add_argument("--log-ratio", metavar="COL", help="list<float> column of log-ratios")
    src.add_argument("--ratio", metavar="COL", help="list<float> column of ratios")
    src.add_argument(
        "--mask",
        metavar="COL",
        help="optional mask column: list<bool>, or integers or floats 0/1 (1 = valid token)",
    )
    f = p.add_argument_group("filter settings (defaults: the KPO authors', kpo_rs.FilterParams)")
    f.add_argument(
        "--fit",
        action="store_true",
        help="fit q and r to the file's log-ratios first (maximum likelihood, "
        "kpo_rs.pipeline.fit_parquet; with --r, q alone at that r): kpo filter filters at the "
        "fitted settings and records them in OUT's metadata, kpo analyze reports them "
        "('--q fit' is an alias)",
    )
    f.add_argument(
        "--q",
        type=_q_option,
        help=f"process-noise variance (default {d.q:g}); 'fit' is an alias of --fit",
    )
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
        "--batch-size", type=positive, default=4096, help="rows per record batch (default 4096)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.add_argument(
        "--log-every",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="when stderr is not a terminal, a progress line every SECONDS (default 10)",
    )


def columns_of(args: argparse.Namespace):
    from ..pipeline import Columns

    given = [
        args.log_probs is not None or args.old_log_probs is not None,
        args.log_ratio,
        args.ratio,
    ]
    if sum(bool(g) for g in given) > 1:
        named = [
            flag
            for flag, value in (
                ("--log-probs/--old-log-probs", given[0]),
                ("--log-ratio", args.log_ratio),
                ("--ratio", args.ratio),
            )
            if value
        ]
        raise ValueError(f"give only one source of ratios, got {' and '.join(named)}")
    if sum(bool(g) for g in given) != 1 or (args.log_probs is None) != (args.old_log_probs is None):
        raise ValueError("give --log-probs with --old-log-probs, or --log-ratio, or --ratio")
    return Columns(args.log_probs, args.old_log_probs, args.log_ratio, args.ratio, args.mask)


def _q_option(text: str) -> float | str:
    """``--q``: a number, or ``fit``."""
    if text.strip().lower() == "fit":
        return "fit"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'fit', got {text!r}") from None


def job_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings shared by ``kpo filter`` and ``kpo analyze`` (``--q fit`` reads as the
    default q here: the caller fits, see :func:`fitting`)."""
    from ..params import FilterParams

    q = None if args.q == "fit" else args.q
    try:
        params = FilterParams.resolve(None, q=q, r=args.r, p0=args.p0, masked=args.masked)
    except ValueError as exc:  # FilterParams names the field: name the option
        raise ValueError(f"--{exc}") from exc
    return {
        "params": params,
        "space": args.space,
        "on_non_finite": args.on_non_finite,
        "batch_size": args.batch_size,
    }


def fitting(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The settings ``--fit`` (or its alias ``--q fit``) fits: ``("q", "r")``, or ``("q",)``
    when ``--r`` is given (r held there); None without a fit. ValueError for ``--fit`` with a
    number for ``--q``."""
    if not (args.fit or args.q == "fit"):
        return None
    if args.q is not None and args.q != "fit":
        raise ValueError(f"--fit fits q: drop --q {args.q:g} (or drop --fit)")
    return ("q",) if args.r is not None else ("q", "r")


def fit_warnings(fit: Any) -> list[str]:
    """What to doubt in a :class:`kpo_rs.fit.FilterFit`: too few tokens, ``q / r`` at the search's
    upper edge (1000: each token followed), no interval, no convergence."""
    out = []
    if fit.tokens < 1000:
        out.append(
            f"the fit used {fit.tokens} tokens only: q and r are poorly determined there (see "
            "the interval); fit on more rows"
        )
    if fit.q_over_r >= 999.0:
        out.append(
            f"q/r = {fit.q_over_r:.4g} is at the search's upper edge (1000): the fit follows "
            "every token, which says the data are too few or carry no noise to smooth"
        )
    lo, hi = fit.q_over_r_interval
    if "q" in fit.fitted and (math.isnan(lo) or math.isnan(hi)):
        out.append("the q/r interval could not be computed (nan): do not rely on this fit")
    if not fit.converged:
        out.append("the fit's search did not converge inside its range")
    return out


def null_summary(null_rows: int, bad_rows: list[int]) -> str:
    """``"3 null"`` or ``"3 null: 2 with non-finite values"``: rows null in the input plus rows
    made null for a non-finite value (``--on-non-finite null``)."""
    total = null_rows + len(bad_rows)
    return f"{total} null" + (f": {len(bad_rows)} with non-finite values" if bad_rows else "")


def with_non_finite_hint(message: str, on_non_finite: str) -> str:
    """``message`` with the option that goes past a non-finite value, when it is about one."""
    if on_non_finite == "error" and "non-finite" in message and "--on-non-finite" not in message:
        return f"{message} (--on-non-finite null gives such rows null outputs and goes on)"
    return message


def rows_listed(rows: list[int], what: str, limit: int = 20) -> str:
    """``"2 rows <what>: rows 3, 35"``, at most ``limit`` of them listed."""
    shown = ", ".join(str(r) for r in rows[:limit])
    more = f", ... ({len(rows) - limit} more)" if len(rows) > limit else ""
    s = "" if len(rows) == 1 else "s"
    return f"{len(rows)} row{s} {what}: row{s} {shown}{more}"


def jsonable(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
