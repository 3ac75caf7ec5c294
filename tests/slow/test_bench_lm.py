"""`dve bench lm --quick` writes its table with finite, positive throughputs (~1 min on 2 cores)."""

from __future__ import annotations

import numpy as np
import pytest

from dve_repro.bench import LM_COLS, bench_lm

pytestmark = pytest.mark.slow


def test_bench_lm_quick(tmp_path):
    df = bench_lm(tmp_path, quick=True, steps=1)
    assert list(df.columns) == LM_COLS and len(df) == 1
    row = df.iloc[0]
    for col in ("plain_step_s", "capture_step_s", "alg1_pts_per_s", "query_pts_per_s", "recompute_pts_per_s"):
        assert np.isfinite(row[col]) and row[col] > 0, col
    assert row["storage_bytes_per_point"] == row["p_tilde"] * 4
    assert (tmp_path / "lm.md").read_text().count("|") > 10 and not (tmp_path / "_runs").exists()
