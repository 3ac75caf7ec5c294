"""Progress bars and one-line summaries (rich), silenced with ``runtime.progress=false``
or ``DVE_QUIET=1`` (the test suite sets the latter)."""

from __future__ import annotations

import contextlib
import os
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
_enabled = True


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = flag


def enabled() -> bool:
    return _enabled and os.environ.get("DVE_QUIET", "") in ("", "0")


def log(msg: str) -> None:
    if enabled():
        _console.print(msg, highlight=False)


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


@contextlib.contextmanager
def bar(description: str, total: int, unit: str = "it", completed: int = 0) -> Iterator[_Bar | _NullBar]:
    """A progress bar with rate and ETA; a no-op when output is silenced."""
    if not enabled():
        yield _NullBar()
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
