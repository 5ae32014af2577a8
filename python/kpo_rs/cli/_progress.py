"""The one progress display of the ``kpo`` commands (:class:`Progress`)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """Units done of a long job, called as ``progress(done, total)`` or ``progress(done, total,
    note)``: a transient rich bar when stderr is a terminal (and rich is installed), otherwise a
    line on stderr every ``every`` seconds, so logs show progress; ``note`` (say, the run in
    progress and its reward) is shown beside the count. Nothing is shown before the first call,
    which the jobs make once the input and output are checked."""

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
            TextColumn("{task.fields[note]}"),
            TimeRemainingColumn(),
        )
        self._bar = Progress(*columns, console=Console(file=self.stream), transient=True)
        self._task = self._bar.add_task(self.command, total=None, note="")
        self._bar.start()

    def __call__(self, done: int, total: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self._started:
            self._started, self._start, self._last = True, now, now
            if self.stream.isatty():
                self._start_bar()
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, note=note)
        elif done > 0 and now - self._last >= self.every:
            self._last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            detail = f", {note}" if note else ""
            print(
                f"kpo {self.command}: {done}/{total} {self.unit}{share}, "
                f"{now - self._start:.0f} s{detail}",
                file=self.stream,
                flush=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
