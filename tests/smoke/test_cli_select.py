"""`dve select` end to end on a tiny profile (tiny MLP, every schedule, 2 seeds): the table,
the figures and the claims section, the numbers read back against the runs themselves; bad
input refused before the first run trains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from dve_repro.cli import app

PROFILE = ["experiment=tiny_mlp", "select.windows=fractions", "select.early_end=0.125", "select.late_start=0.875",
           "select.n_split=32", "select.val_batch=8", "select.seeds=[0,1]", "train.eval_every=4",
           "projection.k_in=16", "projection.k_out=4", "runtime.progress=false"]


def test_dve_select_writes_its_table_figures_and_claims(tmp_path, one_thread):
    root, results = tmp_path / "runs", tmp_path / "results"
    res = CliRunner().invoke(app, ["select", *PROFILE, f"runtime.out_root={root}", "--results", str(results)])
    assert res.exit_code == 0, (res.output, res.exception)
    for name in ("selection.csv", "selection.md", "curves.csv", "curves.png", "gain_vs_cost.png", "COMMAND.txt"):
        assert (results / name).is_file(), name
    runs = pd.read_csv(results / "selection.csv")
    assert sorted(runs["schedule"].unique()) == sorted(["never", "always", "early_late", "early", "late"])
    assert sorted(runs["seed"].unique()) == [0, 1]
    T = 16
    steps = runs.groupby("schedule")["selecting_steps"].first().to_dict()
    assert steps == {"never": 0, "always": T, "early_late": 4, "early": 2, "late": 2}
    assert (runs["candidate_grads"] == runs["selecting_steps"] * 4 * 32).all()  # pool 4 × batch 32
    assert (runs.loc[runs.schedule == "never", "distinct_points"] == 256).all()  # plain epochs see every point
    curves = pd.read_csv(results / "curves.csv")
    final = curves[curves.step == T].set_index(["schedule", "seed"])["val_loss"]
    np.testing.assert_allclose(runs.set_index(["schedule", "seed"])["final_val_loss"], final.loc[
        list(runs.set_index(["schedule", "seed"]).index)].to_numpy())
    md = (results / "selection.md").read_text()
    # the gain fraction of early_late, recomputed from the per-run losses
    loss = runs.pivot(index="seed", columns="schedule", values="final_val_loss")
    gain = loss["never"].to_numpy()[:, None] - loss.to_numpy()
    g = dict(zip(loss.columns, gain.mean(axis=0), strict=True))
    row = next(ln for ln in md.splitlines() if ln.startswith("| early_late |"))
    assert f"{g['early_late'] / g['always']:.4g}" in row
    assert "**early_late**" in md and "**early**" in md
    # the seeds differ, the schedules of one seed start from the same θ_0
    never = runs[runs.schedule == "never"].set_index("seed")["final_val_loss"]
    assert never[0] != never[1]
    first = curves[curves.step == 0].pivot(index="schedule", columns="seed", values="val_loss")
    assert (first.nunique(axis=0) == 1).all() and first[0].iloc[0] != first[1].iloc[0]


def test_dve_select_refuses_bad_windows_before_training(tmp_path):
    root = tmp_path / "runs"
    res = CliRunner().invoke(app, ["select", *PROFILE, f"runtime.out_root={root}", "select.windows=phases",
                                   "--results", str(tmp_path / "r")])
    assert res.exit_code == 2
    assert res.stderr.strip().startswith("error: ") and "early window holds no step" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not any(Path(root).rglob("trajectory.parquet")) if root.exists() else True
    res = CliRunner().invoke(app, ["select", *PROFILE, f"runtime.out_root={root}", "train.eval_every=0"])
    assert res.exit_code == 2 and "train.eval_every" in res.stderr


def test_ad_hoc_overrides_never_write_the_committed_results(tmp_path):
    from dve_repro.cli import default_results
    from dve_repro.config import compose

    cfg = compose(["experiment=pythia_tiny_selection"])
    assert default_results(cfg, ["experiment=pythia_tiny_selection", "runtime.progress=false"], "select") == \
        Path("results/pythia_tiny_selection")
    adhoc = default_results(cfg, ["experiment=pythia_tiny_selection", "select.seeds=[0]"], "select")
    assert adhoc.parent == Path(cfg.runtime.out_root) / "pythia_tiny_selection" and adhoc.name.startswith("select-")
