"""Markdown tables of the small results (one writer for every ``*.md`` table dve commits)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

Format = str | Callable[[Any], str]


def markdown_table(df: pd.DataFrame, fmt: Format = "{:.3f}", *, columns: Sequence[str] | None = None,
                   formats: Mapping[str, Format] | None = None, nan: str | None = None) -> str:
    """A GitHub markdown table of ``df`` (``columns`` in that order, default all), newline-ended.

    A cell is ``fmt(v)`` when ``fmt`` is callable (it sees every value); otherwise floats are
    ``fmt.format(v)`` and everything else ``str(v)``. ``formats`` overrides ``fmt`` per column;
    ``nan`` (when given) replaces a float NaN."""
    cols = list(columns) if columns is not None else list(df.columns)
    formats = formats or {}

    def cell(col: str, v: Any) -> str:
        f = formats.get(col, fmt)
        if callable(f):
            return f(v)
        if isinstance(v, float):
            return nan if nan is not None and np.isnan(v) else f.format(v)
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(cols, row, strict=True)) + " |"
              for row in df[cols].itertuples(index=False)]
    return "\n".join(lines) + "\n"
