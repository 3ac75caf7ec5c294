"""`dve bench adamw --quick` writes its table with the three recursions and their ratios."""

from __future__ import annotations

import pandas as pd
import torch

from dve_repro import torch_state
from dve_repro.bench import bench_adamw


def test_quick_bench_writes_the_table(tmp_path):
    with torch_state.threads(2):
        df = bench_adamw(tmp_path, quick=True, threads=1)
        assert torch.get_num_threads() == 2  # the caller's thread count is back
    assert set(df["recursion"]) == {"sgd", "adamw-mask", "adamw-kron"}
    assert (df.loc[df["recursion"] == "sgd", "ratio_to_sgd"] == 1.0).all()
    assert (df["ms_per_step"] > 0).all()
    on_disk = pd.read_csv(tmp_path / "adamw.csv")
    assert len(on_disk) == len(df) and "dve bench adamw --quick" in (tmp_path / "adamw.md").read_text()
