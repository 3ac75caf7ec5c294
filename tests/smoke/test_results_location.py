"""Where results go: the experiment as committed writes ``results/<experiment>/`` (relative to
the working directory, as the README's commands expect); any other override is an ad-hoc run
and writes under the ignored run root, so a user's experiment never replaces the committed
tables; ``--results`` always wins; every result folder records the command as typed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dve_repro.cli import app, default_results
from dve_repro.config import compose

pytestmark = pytest.mark.usefixtures("one_thread")

CHEAP = ["tsloo.n_points=4", "tsloo.settings=[single]", "tsloo.conventions=[keep]", "baselines.curvatures=[]",
         "baselines.bootstrap=10", "--no-baselines"]


def test_default_results_by_overrides():
    cfg = compose(["experiment=tiny_mlp"])
    assert default_results(cfg, ["experiment=tiny_mlp", "runtime.threads=1"], "compare") == Path("results/tiny_mlp")
    assert default_results(cfg, [], "phases") == Path("results/tiny_mlp")
    assert default_results(cfg, [], "decomposition", "decomposition") == Path("results/tiny_mlp/decomposition")
    a = default_results(cfg, ["experiment=tiny_mlp", "optim.lr=0.2"], "compare")
    b = default_results(cfg, ["optim.lr=0.2", "experiment=tiny_mlp", "runtime.progress=false"], "compare")
    c = default_results(cfg, ["experiment=tiny_mlp", "optim.lr=0.3"], "compare")
    assert a == b != c and a.parent == Path(cfg.runtime.out_root) / "tiny_mlp" and a.name.startswith("compare-")


def test_an_ad_hoc_comparison_leaves_the_committed_folder_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    base = ["experiment=tiny_mlp", f"runtime.out_root={runs}", "runtime.progress=false"]
    args = ["compare-tsloo", *base, *CHEAP]
    monkeypatch.setattr(sys, "argv", ["dve", *args])  # as the console script sees them
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    (adhoc,) = [p for p in (runs / "tiny_mlp").glob("compare-*") if (p / "summary.csv").is_file()]
    assert not (tmp_path / "results").exists()
    assert (adhoc / "COMMAND.txt").read_text().split() == ["dve", "compare-tsloo", *base, *CHEAP]

    res = CliRunner().invoke(app, ["compare-tsloo", *base, *CHEAP, "--results", str(tmp_path / "mine")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "mine" / "summary.csv").is_file() and not (tmp_path / "results").exists()
