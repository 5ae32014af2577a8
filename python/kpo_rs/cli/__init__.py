"""The ``kpo`` command.

``kpo demo`` runs a small RL comparison of policy losses on CPU and writes a table, plots and
metrics; ``kpo sweep`` runs the demo over a grid of settings; ``kpo filter`` adds filtered-ratio
columns to a Parquet file of rollouts; ``kpo analyze`` prints ratio diagnostics of one and draws
plots; ``kpo bench`` measures the Rust core against numpy baselines on this machine. ``kpo`` alone
prints this help; ``kpo --version`` the version.

One module per sub-command (:data:`COMMANDS`), each with ``add_parser(sub, full)`` and
``run(args)``; ``_common`` and ``_progress`` hold what they share. argparse (standard library)
keeps ``import kpo_rs`` free of extra dependencies and the start-up fast; each sub-command imports
what it needs and, when a package is missing, names the extra to install. Errors a person can fix
(a missing column, a wrong type, an unreadable file) print one line and exit 2; Ctrl-C prints one
line and exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

from ._common import missing_extra_message, missing_module

__all__ = ["COMMANDS", "build_parser", "main", "missing_extra_message"]

#: The sub-commands in the order ``kpo --help`` lists them; each is ``kpo_rs.cli.<name>``.
COMMANDS = ("demo", "sweep", "filter", "analyze", "bench", "doctor")


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``kpo`` parser; ``command`` is the sub-command about to run (its optional imports are
    made only then)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="kpo",
        description="kpo-rs: causal Kalman filtering of importance ratios for KPO policy "
        "optimization.",
    )
    parser.add_argument("--version", action="version", version=f"kpo-rs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if name == "sweep" and command != "sweep":
            # the sweep's module imports the experiments; list it without them
            sub.add_parser(
                "sweep",
                help="run the demo over a grid of settings and seeds, resumable, with a report",
                add_help=False,
            )
            continue
        _command_module(name).add_parser(sub, full=command == name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``kpo`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(command)
    except ImportError as exc:
        module = missing_module(exc)
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
    args, extra = parser.parse_known_args(argv)
    if extra:
        # an unknown flag is the sub-command's error, with the sub-command's usage
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        target = sub.choices.get(args.command) if args.command else None
        (target or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(_command_module(args.command).run(args))
    except ImportError as exc:
        module = missing_module(exc)
        if module is None:
            raise
        print(missing_extra_message(args.command, module), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
