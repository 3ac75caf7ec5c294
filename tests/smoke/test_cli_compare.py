"""`dve compare-tsloo` end to end on the tiny run through Typer's CliRunner: every output
file is written, the tables have the documented columns, and per-point baselines give one
value per training point whatever the removal setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dve_repro.cli import app

TIDY_COLUMNS = ["index", "setting", "convention", "method", "estimate", "truth"]
SUMMARY_COLUMNS = ["method", "setting", "convention", "n", "spearman", "spearman_lo", "spearman_hi",
                   "pearson", "pearson_lo", "pearson_hi", "per_point_spearman", "per_point_pearson"]
METHODS = {"dvemb", "unrolled-hessian", "unrolled-ef", "influence", "tracin", "grad-dot"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_compare_tsloo_writes_tables_and_figures(tiny, tmp_path):
    results = tmp_path / "results"
    args = ["compare-tsloo", *tiny("tsloo.n_points=12", "baselines.val_points=5", "baselines.bootstrap=50",
                                  "baselines.curvatures=[hessian,ef]"), "--results", str(results)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, f"exit {res.exit_code}: {res.output}\n{res.exception!r}"
    for name in ["tidy.csv", "summary.csv", "summary.md", "scatter.png", "scatter.pdf", "correlations.png",
                 "correlations.pdf", "COMMAND.txt"]:
        f = results / name
        assert f.is_file() and f.stat().st_size > 0, f"missing or empty {name}"

    tidy = pd.read_csv(results / "tidy.csv")
    assert list(tidy.columns) == TIDY_COLUMNS
    assert set(tidy["method"]) == METHODS
    assert set(tidy["setting"]) == {"single", "all"}
    assert set(tidy["convention"]) == {"keep", "renormalize"}
    assert len(tidy) == 12 * 2 * 2 * len(METHODS)
    assert np.isfinite(tidy[["estimate", "truth"]].to_numpy()).all()
    # ground truth is the same for every method
    truth = tidy.pivot_table(index=["index", "setting"], columns="method", values="truth")
    assert (truth.nunique(axis=1) == 1).all()

    # influence gives one value per point: identical for single- and all-epoch removal
    keep = tidy[tidy["convention"] == "keep"]
    infl = keep[keep["method"] == "influence"].pivot(index="index", columns="setting", values="estimate")
    assert len(infl) == 12
    np.testing.assert_array_equal(infl["single"].to_numpy(), infl["all"].to_numpy())

    summary = pd.read_csv(results / "summary.csv")
    for c in SUMMARY_COLUMNS:
        assert c in summary.columns, f"summary.csv lacks {c}"
    pairs = set(zip(summary["method"], summary["setting"], strict=True))
    assert pairs == {(m, s) for m in METHODS for s in ("single", "all")}
    assert (summary["n"] == 12).all()
    assert summary["spearman"].between(-1, 1).all() and summary["pearson"].between(-1, 1).all()
    ok = summary["spearman_lo"].notna()
    assert ok.all(), "bootstrap intervals missing"
    assert (summary["spearman_lo"] <= summary["spearman_hi"]).all()

    md = (results / "summary.md").read_text()
    assert md.startswith("| method |") and md.count("\n") == 2 + len(summary)
    assert (results / "COMMAND.txt").read_text().startswith("dve ")  # argv is pytest's under CliRunner
