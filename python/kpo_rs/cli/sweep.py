"""``kpo sweep``: the demo over a grid of settings and seeds, resumable, with a report
(:mod:`kpo_rs.experiments.sweep`). Its options are built only when the command is ``sweep``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from ..experiments.config import split_names
from ..experiments.sweep import PRESETS, SweepConfig, run_sweep

__all__ = ["add_arguments", "add_parser", "config_from_args", "main", "run", "run_cli"]


def add_parser(sub: argparse._SubParsersAction, full: bool) -> None:
    """``kpo sweep``; its options only when the command is ``sweep`` (``full``), so the other
    commands never import the sweep."""
    p = sub.add_parser(
        "sweep",
        help="run the demo over a grid of settings and seeds, resumable, with a report",
        add_help=full,
    )
    if full:
        add_arguments(p)


def run(args: argparse.Namespace) -> int:
    """Runs ``kpo sweep`` (:func:`run_cli`). Every package of the ``demo`` extra is imported
    first, so a missing one is one line naming the extra (:func:`kpo_rs.cli.main`) before any
    run, not a sweep without its plots."""
    import matplotlib  # noqa: F401
    import rich  # noqa: F401
    import torch  # noqa: F401

    return run_cli(args)


def _number_list(kind: type, what: str):
    """An argparse type: a comma-separated list of ``kind`` values (at least one)."""

    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values

    return parse


_floats = _number_list(float, "numbers")


_ints = _number_list(int, "integers")


def _names(text: str) -> tuple[str, ...]:
    values = split_names(text)
    if not values:
        raise argparse.ArgumentTypeError("give at least one value")
    return values


def _caps(text: str) -> tuple[float | None, ...]:
    """``--tis``: comma-separated caps, ``none`` for no weights."""
    out: list[float | None] = []
    for item in _names(text):
        if item.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers or 'none', got {text!r}"
            ) from None
    return tuple(out)


def _variant(text: str) -> Any:
    """``--variant NAME=LOSS:key=value,...`` (:func:`kpo_rs.experiments.variants.parse_variant`)."""
    from ..experiments.variants import parse_variant

    try:
        return parse_variant(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _variants_file(text: str) -> tuple:
    """``--variants FILE`` (:func:`kpo_rs.experiments.variants.read_variants_file`)."""
    from ..experiments.variants import read_variants_file

    try:
        return read_variants_file(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--variants: ")) from None


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kpo sweep`` (each grid option takes a comma-separated list)."""
    d = SweepConfig.__dataclass_fields__
    if not parser.description:
        parser.description = (
            "Runs the demo's task for every combination of the grid's values, each loss on the "
            "same seeds, and writes results.csv (one row per run), report.md (which loss wins "
            "where, by how much, with uncertainty) and plots to --out. Finished runs are stored "
            "as they end: the same command continues an interrupted sweep."
        )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a named grid: 'decisive' (issue 32's pre-registered sweep, "
        "docs/sweep/decisive/PREREGISTRATION.md: 16 arms x 4 engines x 16 seeds, learning rate "
        "tuned on the white engine, 1120 runs, about 2.5 hours with 2 workers; its report tests "
        "the pre-registered contrasts only and lists the rest as exploratory), 'mismatch' "
        "(GRPO, gpg, KPO and KPO-clipped with three filter arms, with and without engine logit "
        "noise, 5 learning rates tuned on 2 seeds, 16 reported seeds: 416 runs, about 50 "
        "minutes with 2 workers; docs/results.md), 'paper' (1 on-policy + 3 off-policy "
        "minibatches per rollout batch, authors' filter settings, every loss, about an hour on "
        "2 cores), 'default' (a grid around the demo's default); flags given explicitly "
        "override it (--variant, --variants or --losses replace its arms and drop its "
        "contrasts)",
    )
    parser.add_argument(
        "--variant",
        dest="variant_list",
        action="append",
        type=_variant,
        metavar="NAME=LOSS:KEY=VALUE,...",
        help="an arm (repeatable): a loss with run settings filter (authors, window:W, fit), "
        "band (authors, rescaled: the rescaled band (kpo-rs variant) of the variant's filter, "
        "rescaled:W: that of a window:W filter, or LOW,HIGH), old_logp (engine: bypass, "
        "trainer: decoupled), tis (a cap), correction (rs-geo, seq-mask, icepop, "
        "dropneg-random, dropneg-seq; optional numbers after ':'), q, p0, and any of the "
        "loss's settings (clip_ratio_low, space, loss_agg_mode, ...), e.g. "
        "kpoc=kpo_clipped:filter=window:16,band=rescaled,space=ratio",
    )
    parser.add_argument(
        "--variants",
        dest="variants_file",
        type=_variants_file,
        metavar="FILE",
        help="arms from a TOML or JSON file: name -> {loss = ..., settings = {key = value}} "
        "(added before any --variant)",
    )
    parser.add_argument(
        "--losses",
        type=split_names,
        metavar="LIST",
        help="comma-separated loss names from kpo_rs.losses.LOSSES (default grpo,kpo_clipped; "
        "presets: all)",
    )
    parser.add_argument(
        "--lr", dest="lrs", type=_floats, metavar="LIST", help="learning rates (default 1e-2)"
    )
    parser.add_argument(
        "--minibatches",
        type=_ints,
        metavar="LIST",
        help="updates per rollout batch, e.g. 1,4 (default 4)",
    )
    parser.add_argument(
        "--lag",
        dest="lags",
        type=_ints,
        metavar="LIST",
        help="rollouts come from the policy this many updates old (default 1)",
    )
    parser.add_argument(
        "--response-len",
        dest="response_lens",
        type=_ints,
        metavar="LIST",
        help="answer lengths (default 128)",
    )
    parser.add_argument(
        "--q",
        dest="qs",
        type=_floats,
        metavar="LIST",
        help="filter process-noise variances for the KPO losses (default: the authors')",
    )
    parser.add_argument(
        "--p0",
        dest="p0s",
        type=_floats,
        metavar="LIST",
        help="filter prior variances for the KPO losses, inf = flat prior (default: the authors')",
    )
    parser.add_argument(
        "--filter",
        dest="filter_arms",
        type=_names,
        metavar="LIST",
        help="filter arms for the KPO losses: authors (q=1e-6, r=1, p0=0), window:W "
        "(q/r = 1/W^2), fit (q and r fitted on each run's first steps) (default authors)",
    )
    parser.add_argument(
        "--mismatch",
        dest="mismatches",
        type=_names,
        metavar="LIST",
        help="inference-engine mismatches: none, logit-noise:S (white Student-t logit noise of "
        "scale S nats), logit-noise-ar1:S:RHO (the same, AR(1) along the response), offset:S "
        "(a per-response logit bias of scale S), bursts:S:P:L (runs of mean length L tokens, "
        "starting with probability P per token, with logit noise of scale S), bf16 (bfloat16 "
        "autocast), int8 (fake-quantised weights) (default none)",
    )
    parser.add_argument(
        "--old-logp",
        dest="old_logps",
        type=_names,
        metavar="LIST",
        help="whose log-probs are old_log_prob: engine (bypass mode) and/or trainer "
        "(decoupled) (default engine)",
    )
    parser.add_argument(
        "--tis",
        dest="tiss",
        type=_caps,
        metavar="LIST",
        help="TIS caps with --old-logp trainer: rollout_is_weights = min(exp(trainer - "
        "engine), CAP); 'none' for no weights (default none)",
    )
    parser.add_argument(
        "--seeds", type=_count, metavar="N", help="reported seeds per cell (default 3)"
    )
    parser.add_argument("--steps", type=_count, metavar="N", help="RL steps per run (default 40)")
    parser.add_argument(
        "--seed0",
        type=_count,
        metavar="N",
        help="first seed (default 0); tuning seeds start 1000 above",
    )
    parser.add_argument(
        "--tune-lr",
        action="store_true",
        default=None,
        help="choose each loss's learning rate from --lr on separate tuning seeds first",
    )
    parser.add_argument(
        "--tune-seeds",
        type=_count,
        metavar="N",
        help="seeds per learning rate when tuning (default 2)",
    )
    parser.add_argument(
        "--tune-on",
        metavar="MISMATCH",
        help="tune the learning rate on this engine only and use the chosen rate on every "
        "engine (default: each engine tunes its own)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (arms, engines, run count, time estimate) and run nothing",
    )
    parser.add_argument(
        "--workers",
        type=_count,
        metavar="N",
        help=f"worker processes, one torch thread each (default: the cores, "
        f"{cast(Any, d['workers'].default_factory)()} here)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run each run as a Ray task (one CPU each): on a local Ray instance without "
        "ADDRESS, or on the cluster at ADDRESS (auto, ray://HOST:10001); runs are stored here "
        "exactly as with --workers",
    )
    parser.add_argument("--out", metavar="DIR", help="output folder (default kpo-sweep-out)")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write results.csv, report.md and plots from the stored runs (without "
        "grid options: every run in OUT/runs; never replaces a report with one of fewer runs)",
    )


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The :class:`SweepConfig` of parsed options: defaults, then the preset, then the flags."""
    from ..experiments.variants import parse_variant
    from ..losses.table import LOSS_NAMES

    values: dict[str, Any] = {}
    if args.preset:
        values.update(PRESETS[args.preset])
        values["preset"] = args.preset
        if values.get("losses") is None:
            values["losses"] = LOSS_NAMES
        values["variants"] = tuple(parse_variant(v) for v in values.get("variants", ()))
    names = (
        "losses", "lrs", "minibatches", "lags", "response_lens", "qs", "p0s", "filter_arms",
        "mismatches", "old_logps", "tiss", "seeds", "steps", "seed0", "tune_lr", "tune_seeds",
        "tune_on", "workers", "ray", "out",
    )  # fmt: skip
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    given = tuple(getattr(args, "variants_file", None) or ()) + tuple(
        getattr(args, "variant_list", None) or ()
    )
    if given or getattr(args, "losses", None) is not None:
        # New arms: the preset's arms and its pre-registered contrasts no longer apply.
        values["variants"] = given
        values.pop("contrasts", None)
    return SweepConfig(**values)


def run_cli(args: argparse.Namespace) -> int:
    """``kpo sweep``: 0 when done, 2 for a bad option (one line), 130 on Ctrl-C (the finished
    runs stay stored; the same command continues)."""
    cfg = config_from_args(args)
    command = _command_line(cfg)
    if getattr(args, "report_only", False) and not _grid_given(args):
        return _report_from_stored(Path(cfg.out))
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"kpo sweep: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "dry_run", False):
        _print_plan(cfg, command)
        return 0
    try:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        probe = Path(cfg.out) / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        print(f"kpo sweep: --out: cannot write to {cfg.out}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        before = _snapshot(Path(cfg.out)) if args.report_only else None
        report = run_sweep(cfg, command=command, report_only=args.report_only)
        if before is not None and _emptier(Path(cfg.out), before):
            return 2
    except KeyboardInterrupt:
        print(
            f"kpo sweep: interrupted; finished runs are stored in {Path(cfg.out) / 'runs'}, "
            "run the same command to continue",
            file=sys.stderr,
        )
        return 130
    plots = sorted(
        p.name for p in report.parent.glob("*.png") if f"]({p.name})" in report.read_text()
    )
    print(
        f"wrote {report.parent / 'results.csv'}, {report}"
        + (f" and {', '.join(plots)}" if plots else " (no plots: matplotlib is missing)")
    )
    return 0


# --report-only (owned with kpo_rs.experiments.report): never replace a finished report with an
# emptier one.
_GRID = ("preset", "losses", "lrs", "minibatches", "lags", "response_lens", "qs", "p0s",
         "filter_arms", "mismatches", "old_logps", "tiss", "seeds", "steps", "seed0", "tune_lr",
         "tune_seeds", "tune_on", "variant_list", "variants_file")  # fmt: skip


def _print_plan(cfg: SweepConfig, command: str) -> None:
    """``--dry-run``: the arms, engines, contrasts, run count and time estimate."""
    from ..experiments.sweep import plan, plan_text

    tune, evals = plan(cfg)
    print(f"command: {command}")
    print("arms:")
    for v in cfg.arms():
        print(f"  {v.name}: {v.describe()}")
    print(f"engines: {', '.join(cfg.mismatches)}")
    if cfg.tune_lr:
        where = "every engine" if cfg.tune_on is None else f"{cfg.tune_on} only"
        print(
            f"learning rates: {', '.join(f'{lr:g}' for lr in cfg.lrs)} tuned on "
            f"{cfg.tune_seeds} tuning seeds on {where}"
        )
    if cfg.contrasts:
        print("pre-registered contrasts (per engine, Holm over all):")
        for a, b in cfg.contrasts:
            print(f"  {a} - {b}")
    print(plan_text(cfg, len(tune), len(evals)))


def _grid_given(args: argparse.Namespace) -> bool:
    """Whether any option choosing the grid was given (they default to None)."""
    return any(getattr(args, name, None) is not None for name in _GRID)


def _report_from_stored(out: Path) -> int:
    """``--report-only`` without grid options: the report of every run stored in ``out/runs``,
    or a one-line refusal that leaves every file as it was."""
    from ..experiments.report import rebuild

    try:
        report, figures = rebuild(out, command=f"kpo sweep --report-only --out {out}")
    except (ValueError, OSError) as exc:
        print(f"kpo sweep: {exc}", file=sys.stderr)
        return 2
    tail = f" and {', '.join(figures)}" if figures else " (no plots: matplotlib is missing)"
    print(f"wrote {out / 'results.csv'}, {report}{tail}")
    return 0


def _snapshot(out: Path) -> dict[str, bytes]:
    """The report files of ``out`` as they are now (results.csv, report.md, plots)."""
    names = ["results.csv", "report.md", *(p.name for p in out.glob("*.png"))]
    return {n: (out / n).read_bytes() for n in names if (out / n).is_file()}


def _emptier(out: Path, before: dict[str, bytes]) -> bool:
    """When the report just written has fewer rows than the one it replaced: puts the old files
    back, says so in one line and returns True."""
    from .. import _files

    def count(data: bytes | None) -> int:
        return 0 if not data else max(0, len(data.decode().strip().splitlines()) - 1)

    old, new = count(before.get("results.csv")), count((out / "results.csv").read_bytes())
    if new >= old:
        return False
    for name, data in before.items():
        with _files.replacing(out / name) as tmp, open(tmp, "wb") as f:
            f.write(data)
    print(
        f"kpo sweep: --report-only: the grid's options match {new} stored runs, fewer than the "
        f"{old} rows of {out / 'results.csv'}; left the report as it was (without the grid's "
        "options it reports every stored run)",
        file=sys.stderr,
    )
    return True


def _command_line(cfg: SweepConfig) -> str:
    """The command that reproduces ``cfg`` (explicit flags for every grid axis)."""

    def join(values: Sequence[Any]) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    shape = [
        f"--lr {join(cfg.lrs)}",
        f"--minibatches {join(cfg.minibatches)}",
        f"--lag {join(cfg.lags)}",
        f"--response-len {join(cfg.response_lens)}",
    ]
    if cfg.variants:
        if cfg.preset is not None and cfg.contrasts:
            # the preset's arms and contrasts (explicit --variant flags would drop the contrasts)
            head = ["kpo sweep", f"--preset {cfg.preset}"]
        else:
            head = ["kpo sweep", *(f"--variant {v.spec()}" for v in cfg.variants)]
        parts = [*head, *shape, f"--mismatch {join(cfg.mismatches)}"]
    else:
        parts = [
            "kpo sweep",
            f"--losses {join(cfg.losses)}",
            *shape,
            f"--q {join(cfg.qs)}",
            f"--p0 {join(cfg.p0s)}",
            f"--filter {join(cfg.filter_arms)}",
            f"--mismatch {join(cfg.mismatches)}",
            f"--old-logp {join(cfg.old_logps)}",
            f"--tis {join(['none' if t is None else t for t in cfg.tiss])}",
        ]
    parts += [f"--seeds {cfg.seeds}", f"--steps {cfg.steps}"]
    if cfg.seed0:
        parts.append(f"--seed0 {cfg.seed0}")
    if cfg.tune_lr:
        parts.append(f"--tune-lr --tune-seeds {cfg.tune_seeds}")
        if cfg.variants and cfg.tune_on is not None:  # (the loss grid's line never had it)
            parts.append(f"--tune-on {cfg.tune_on}")
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kpo_rs.cli.sweep ...``: the same as ``kpo sweep ...``."""
    parser = argparse.ArgumentParser(
        prog="kpo sweep", description=__doc__.split("\n\n")[0].replace("\n", " ")
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
