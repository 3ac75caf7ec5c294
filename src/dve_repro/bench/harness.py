"""The machinery every benchmark shares: session, timing, medians, the header and the tables.

A benchmark writes ``<out_dir>/<name>.csv`` (every column) and ``<out_dir>/<name>.md`` (a
header line naming the command, date, torch threads and CPU count, notes, then the tables,
through :func:`dve_repro.tables.markdown_table`), and prints the table. Alternatives are
timed side by side in the same process and, within each repeat, one right after the
other, so that the ratios see the same machine load; every number is the median over the
repeats (``time.perf_counter``).

:class:`Session` holds one benchmark call's torch thread count (restored after it), quiet
progress bars and a scratch folder for run directories under ``<out_dir>/_runs``, removed
at the end (``keep_runs=True`` keeps it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dve_repro import torch_state, ui
from dve_repro.tables import markdown_table


def median(xs: Sequence[float]) -> float:
    """The median of ``xs`` without its Nones and NaNs (NaN when nothing is left)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # not available on every platform
        return "n/a"


def cell(v: Any) -> str:
    """A table cell: ints with thousands separators, floats to 4 significant digits
    (scientific outside [1e-3, 1e5)), missing values as "–"."""
    if v is None or v is pd.NA:
        return "–"
    if isinstance(v, bool | np.bool_):
        return str(bool(v))
    if isinstance(v, int | np.integer):
        return f"{int(v):,}"
    if isinstance(v, float | np.floating):
        v = float(v)
        if math.isnan(v):
            return "–"
        if v == 0.0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def table(df: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """The markdown table of ``df`` (``columns``, default all) with :func:`cell` formatting, newline-ended."""
    return markdown_table(df, cell, columns=columns)


def print_table(title: str, df: pd.DataFrame, columns: Sequence[str]) -> None:
    """Plain aligned text on stdout (wide tables stay readable when piped or in a narrow terminal)."""
    cells = [[cell(row[c]) for c in columns] for _, row in df.iterrows()]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))


def header(command: str, threads: int, started: float, load_start: str) -> str:
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"`{command}` · {now} · torch threads {threads} · cpu count {os.cpu_count()} · "
        f"torch {torch.__version__} · load avg (1 min) {load_start} at start, {load_avg()} at end · "
        f"runtime {time.perf_counter() - started:.0f} s"
    )


def write_outputs(out_dir: Path, name: str, df: pd.DataFrame, header: str, notes: list[str],
                  tables: list[tuple[str, list[str]]], closing: Sequence[str] = ()) -> None:
    """``<out_dir>/<name>.csv`` and ``<out_dir>/<name>.md``: title, header, notes, one
    section per (title, columns) of ``tables``, then the ``closing`` lines as a summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df.to_csv(out_dir / f"{name}.csv", index=False)
    parts = [f"# {name} benchmark", "", header, ""]
    parts += [f"- {n}" for n in notes]
    for title, cols in tables:
        parts += ["", f"## {title}", "", table(df, cols).removesuffix("\n")]
    if closing:
        parts += ["", "## Summary", "", *[f"- {n}" for n in closing]]
    (out_dir / f"{name}.md").write_text("\n".join(parts) + "\n")


class Session:
    """Threads, quiet progress bars and a scratch folder for one benchmark call."""

    def __init__(self, out_dir: Path, threads: int, keep_runs: bool):
        self.out_dir, self.threads, self.keep_runs = Path(out_dir), threads, keep_runs

    def __enter__(self) -> Session:
        self.show = ui.enabled()  # the caller's choice, for this session's own lines
        self._scoped = contextlib.ExitStack()
        self._scoped.enter_context(torch_state.threads(self.threads))
        self._scoped.enter_context(ui.progress(False))  # the timed stages draw no bars
        (self.out_dir / "_runs").mkdir(parents=True, exist_ok=True)
        self.scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=self.out_dir / "_runs"))
        self.started = time.perf_counter()
        self.load_start = load_avg()
        return self

    def __exit__(self, *exc) -> None:
        self._scoped.close()
        if not self.keep_runs:
            shutil.rmtree(self.scratch, ignore_errors=True)
            runs = self.out_dir / "_runs"
            if runs.is_dir() and not any(runs.iterdir()):
                runs.rmdir()

    def say(self, msg: str) -> None:
        if self.show:
            from rich.console import Console

            Console(stderr=True).print(msg, highlight=False)

    def overrides(self, *extra: str, threads: int | None = None) -> list[str]:
        return [f"runtime.out_root={self.scratch}", "runtime.progress=false",
                f"runtime.threads={threads or self.threads}", *extra]

