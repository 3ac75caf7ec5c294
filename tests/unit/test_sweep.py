"""Sweeps and ground-truth shards through Hydra's launchers (sweep.py) equal the sequential run."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dve_repro import artifacts, sweep, tsloo
from dve_repro.cli import app
from dve_repro.config import compose
from dve_repro.errors import ArtifactError, DveError
from dve_repro.replay import TrainedRun
from dve_repro.train import run_training


def _echo(overrides, item=None):  # a launcher job (module level: launchers pickle it)
    if "optim.lr=0.3" in overrides:
        raise DveError("refused on purpose")
    return overrides, item, os.getpid()


def test_basic_launcher_runs_the_full_product_in_order_and_writes_nothing_to_the_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = sweep.launch(["optim.lr=0.1,0.2", "train.epochs=1,2", "seed=3"], _echo, tmp_path / "sweeps")
    jobs = [ov for ov, _, _ in out]
    assert jobs == [["optim.lr=0.1", "train.epochs=1", "seed=3"], ["optim.lr=0.1", "train.epochs=2", "seed=3"],
                    ["optim.lr=0.2", "train.epochs=1", "seed=3"], ["optim.lr=0.2", "train.epochs=2", "seed=3"]]
    assert all(value[0] == ov and value[2] == os.getpid() for ov, _, value in out)  # basic: in this process
    assert list(cwd.iterdir()) == []
    (record,) = (tmp_path / "sweeps").iterdir()
    assert (record / "multirun.yaml").is_file()


def test_listed_jobs_go_to_joblib_worker_processes(tmp_path):
    out = sweep.launch(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=1"], _echo,
                       tmp_path, items=["0/2", "1/2"])
    assert [item for _, item, _ in out] == ["0/2", "1/2"]
    assert all(value[0] == ["seed=1"] and value[1] == item for _, item, value in out)
    assert all(value[2] != os.getpid() for _, _, value in out)


def test_failed_jobs_are_one_error_naming_each(tmp_path):
    with pytest.raises(DveError, match=r"1 of 2 sweep jobs failed: \[optim.lr=0.3\]: refused on purpose"):
        sweep.launch(["optim.lr=0.1,0.3"], _echo, tmp_path)
    with pytest.raises(DveError, match=r"cannot launch the sweep: unknown hydra/launcher .no_such_launcher. \(installed: basic, joblib"):
        sweep.launch(["hydra/launcher=no_such_launcher"], _echo, tmp_path)


def test_split_overrides_hands_hydra_its_own():
    assert sweep.split_overrides(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "optim.lr=0.1"]) == (
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], ["optim.lr=0.1"])


# ----------------------------------------------------------------------------- shards
def _base(tiny):
    return tiny("tsloo.n_points=6", "tsloo.chunk_size=2", "tsloo.settings=[single]", "baselines.curvatures=[]",
                "baselines.bootstrap=20")


def test_joblib_sharded_ground_truth_equals_the_sequential_one(tiny, tmp_path, one_thread):
    base = _base(tiny)
    seq = CliRunner().invoke(app, ["compare-tsloo", *base, "--no-baselines", "--results", str(tmp_path / "seq")])
    assert seq.exit_code == 0, seq.output
    two = [*base, f"runtime.out_root={tmp_path / 'sharded'}"]
    res = CliRunner().invoke(app, ["compare-tsloo", *two, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                                   "--shards", "2", "--no-baselines", "--results", str(tmp_path / "par")])
    assert res.exit_code == 0, res.output
    gt_seq, gt_par = tsloo.tsloo_dir(compose(base)), tsloo.tsloo_dir(compose(two))
    assert sorted(p.name for p in gt_par.glob("part-*")) == ["part-0-of-2", "part-1-of-2"]
    d_seq, d_par = np.load(gt_seq / "delta.npy"), np.load(gt_par / "delta.npy")
    assert np.abs(d_seq).max() > 0
    # each shard runs in a joblib worker with one torch thread, as the sequential run here
    np.testing.assert_allclose(d_par, d_seq, rtol=1e-10, atol=1e-15)
    s_seq, s_par = pd.read_csv(tmp_path / "seq" / "summary.csv"), pd.read_csv(tmp_path / "par" / "summary.csv")
    pd.testing.assert_frame_equal(s_seq, s_par, rtol=1e-9)


def test_unfinished_and_disagreeing_shards_are_detected(tiny, one_thread):
    cfg = compose(_base(tiny))
    run = TrainedRun.load(run_training(cfg))
    assert tsloo.unfinished_shards(cfg, run, 2) == [0, 1]
    tsloo.run_tsloo(cfg, run, shard="0/2")
    assert tsloo.unfinished_shards(cfg, run, 2) == [1]
    gt = tsloo.tsloo_dir(cfg)
    assert not (gt / artifacts.DONE).is_file()
    # the last shard merges even while another process holds the folder's lock for a moment
    # (two shards finishing together): it waits instead of refusing
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dve_repro.artifacts import FolderLock; "
                               "l = FolderLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(3)",
                               str(gt)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    tsloo.run_tsloo(cfg, run, shard="1/2")
    holder.wait()
    assert tsloo.unfinished_shards(cfg, run, 2) == [] and (gt / artifacts.DONE).is_file()
    # a stray part of another shard count holding a different value for a job is refused
    stray = gt / "part-0-of-1"
    stray.mkdir()
    delta = np.load(gt / "delta.npy")
    done = np.zeros(len(delta), bool)
    done[0] = True
    delta[0, 0] += 1e-3
    np.save(stray / "delta.npy", delta)
    np.save(stray / "done.npy", done)
    with pytest.raises(ArtifactError, match="disagrees with another part on 1 job"):
        tsloo.merge_shards(gt, len(delta), delta.shape[1] - 1)


# ----------------------------------------------------------------------------- sweeps of comparisons
def test_ablation_and_a_joblib_multirun_give_the_same_summaries(tiny, tmp_path, one_thread):
    """Both jobs of the joblib sweep need the same ground truth (only the projection differs):
    one builds it while the other waits, then reuses it."""
    base = [*_base(tiny), "baselines.bootstrap=0"]
    abl = CliRunner().invoke(app, ["ablate", *base, "projection.k_in=8,16", "--results", str(tmp_path / "abl")])
    assert abl.exit_code == 0, abl.output
    table = pd.read_csv(tmp_path / "abl" / "ablations.csv")
    assert sorted(table["value"].astype(str).unique()) == ["16", "8"] and (table["knob"] == "projection.k_in").all()
    other = [*base, f"runtime.out_root={tmp_path / 'm'}"]
    res = CliRunner().invoke(app, ["compare-tsloo", "-m", *other, "projection.k_in=8,16", "hydra/launcher=joblib",
                                   "hydra.launcher.n_jobs=2", "--no-baselines", "--results", str(tmp_path / "multi")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "m" / "tiny_mlp").glob("tsloo-*"))) == 1  # built once, shared
    for k in (8, 16):
        multi = pd.read_csv(tmp_path / "multi" / f"projection.k_in={k}" / "summary.csv")
        mine = table[table["value"].astype(str) == str(k)].drop(columns=["knob", "value"]).reset_index(drop=True)
        dvemb = lambda t: t[t["method"].str.startswith("dvemb")].reset_index(drop=True)  # noqa: E731
        pd.testing.assert_frame_equal(dvemb(multi)[["method", "setting", "spearman"]],
                                      dvemb(mine)[["method", "setting", "spearman"]], rtol=1e-9)
