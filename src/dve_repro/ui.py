"""Progress bars and one-line summaries (rich), silenced with ``runtime.progress=false``
or ``DVE_QUIET=1`` (the test suite sets the latter).

On a terminal a bar redraws in place; when stderr is a file or a pipe, a long stage
prints one plain line every ``$DVE_PROGRESS_EVERY`` seconds (default 30) instead, so a log
shows that it is alive. Warnings (:func:`warn`) are printed even when quiet."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

_console = Console(stderr=True)
#: Bars and summaries on or off. Written in two places only: :func:`configure` (the CLI, once
#: per command, from ``runtime.progress``) and :func:`progress` (a block that restores it).
#: Pipeline stages never set it, so calling one from a notebook or another stage leaves the
#: caller's choice as it was.
_enabled = True


def configure(flag: bool) -> None:
    """The command's choice (``runtime.progress``), made once by the CLI before a stage runs."""
    global _enabled
    _enabled = flag


@contextlib.contextmanager
def progress(flag: bool) -> Iterator[None]:
    """Bars on (``True``) or off for the block only; the previous choice is restored after."""
    global _enabled
    before, _enabled = _enabled, flag
    try:
        yield
    finally:
        _enabled = before


def _main_rank() -> bool:
    # Under torchrun every rank runs the same stage; only rank 0 reports (the others would
    # print the same bars over one another).
    return os.environ.get("RANK", "0") in ("", "0")


def enabled() -> bool:
    return _enabled and os.environ.get("DVE_QUIET", "") in ("", "0") and _main_rank()


def log(msg: str) -> None:
    if enabled():
        _console.print(msg, highlight=False)


def warn(msg: str) -> None:
    """A line the user must see (a damaged folder being rebuilt, a cache recomputed)."""
    print(msg, file=sys.stderr, flush=True)


class _RateColumn(ProgressColumn):
    """Items per second."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} {self.unit}/s")


class _NullBar:
    def update(self, n: int = 1, **info) -> None:
        pass


class _Bar:
    def __init__(self, progress: Progress, task_id):
        self.progress, self.task_id = progress, task_id

    def update(self, n: int = 1, **info) -> None:
        info_text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
        self.progress.update(self.task_id, advance=n, info=info_text)


class _LineBar:
    """Plain progress lines at intervals, for logs (stderr not a terminal)."""

    def __init__(self, description: str, total: int, unit: str, completed: int, every: float):
        self.description, self.total, self.unit, self.done = description, total, unit, completed
        self.start_done, self.every = completed, every
        self.t0 = self.last = time.monotonic()

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.line(info)

    def line(self, info: dict | None = None) -> None:
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if rate > 0 and self.done < self.total else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        extra = "".join(f"  {k}={v:.4g}" if isinstance(v, float) else f"  {k}={v}" for k, v in (info or {}).items())
        print(f"{self.description}: {self.done}/{self.total} {self.unit}{pct}, {rate:.3g} {self.unit}/s, "
              f"{elapsed:.0f}s elapsed{eta}{extra}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def bar(description: str, total: int, unit: str = "it", completed: int = 0) -> Iterator[_Bar | _NullBar]:
    """A progress bar with rate and ETA; a no-op when output is silenced."""
    if not enabled():
        yield _NullBar()
        return
    if not _console.is_terminal:
        line = _LineBar(description, total, unit, completed, float(os.environ.get("DVE_PROGRESS_EVERY", "30")))
        yield line
        line.line()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=_console,
        transient=False,
    )
    with progress:
        task_id = progress.add_task(description, total=total, completed=completed, info="")
        yield _Bar(progress, task_id)
