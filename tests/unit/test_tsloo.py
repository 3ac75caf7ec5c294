"""Ground-truth retraining (TSLOO, SPEC §1): the batched fast path against the naive
reference, exact zero for a copy with nothing removed, sharding/merging/resuming, and
refusal of impossible removals.

Every test uses the seconds-long ``tiny_mlp`` run in float64 (T = 16 steps of 32 points).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dve_repro import artifacts
from dve_repro.config import compose
from dve_repro.errors import ArtifactError, DveError
from dve_repro.replay import TrainedRun, replay
from dve_repro.train import run_training
from dve_repro.trajectory import ckpt_path
from dve_repro.tsloo import (
    Job,
    batched_delta,
    chunks_of,
    load_ground_truth,
    make_jobs,
    naive_delta,
    parse_shard,
    run_tsloo,
    select_points,
)

# Batched vs naive: the same float64 arithmetic, except that the batched path evaluates
# the copies under vmap and differences against a reference copy; measured agreement is
# ~1e-16 relative, so 1e-12 relative to max |delta| leaves margin for rounding only.
REL_ATOL = 1e-12


def tiny_overrides(root, *extra: str) -> list[str]:
    return ["experiment=tiny_mlp", f"runtime.out_root={root}", "runtime.progress=false", *extra]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_epoch(tmp_path_factory) -> TrainedRun:
    """Checkpoints at epoch starts only (0, 8, 16)."""
    torch.set_num_threads(1)
    return TrainedRun.load(run_training(compose(tiny_overrides(tmp_path_factory.mktemp("ep")))))


@pytest.fixture(scope="module")
def run_every4(tmp_path_factory) -> TrainedRun:
    """Checkpoints every 4 steps (0, 4, 8, 12, 16): replays start mid-run."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("e4")
    return TrainedRun.load(run_training(compose(tiny_overrides(root, "trajectory.checkpoint_every=4"))))


def _assert_close(batched: np.ndarray, naive: np.ndarray, what: str) -> None:
    scale = float(np.abs(naive).max())
    assert scale > 0, f"{what}: naive deltas are all zero, the comparison would be vacuous"
    err = float(np.abs(batched - naive).max())
    assert err <= REL_ATOL * scale, f"{what}: batched vs naive max |Δ| = {err:.3e} (max |delta| {scale:.3e})"


@pytest.mark.parametrize("chunk", [1, 64])
@pytest.mark.parametrize("which", ["run_epoch", "run_every4"])
def test_batched_equals_naive(request, which, chunk):
    run: TrainedRun = request.getfixturevalue(which)
    assert run.T == 16
    points = select_points(run, 3, "uniform", seed=1)
    jobs = make_jobs(run, points, ["single", "all"], ["keep", "renormalize"])
    assert len(jobs) == 12
    if which == "run_every4":
        assert any(0 < j.start < run.T for j in jobs), "no job starts from an intermediate checkpoint"
    base = torch.no_grad()(run.task.per_sample_loss)(run.final_params(), run.task.x_val, run.task.y_val)
    naive = np.stack([naive_delta(run, j, base) for j in jobs])
    batched = np.zeros_like(naive)
    for c in chunks_of(jobs, chunk):
        batched[c] = batched_delta(run, [jobs[j] for j in c], torch.float64)
    worst = int(np.abs(batched - naive).max(axis=1).argmax())
    j = jobs[worst]
    _assert_close(batched, naive, f"{which} chunk={chunk} (worst job {worst}: index {j.index}, {j.setting}, "
                  f"{j.convention}, start {j.start})")
    # column 0 is the mean over validation points
    np.testing.assert_allclose(batched[:, 0], batched[:, 1:].mean(axis=1), rtol=0, atol=1e-15)


def test_job_settings_and_starts(run_every4):
    run = run_every4
    points = select_points(run, 4, "uniform", seed=0)
    jobs = make_jobs(run, points, ["single", "all"], ["keep"])
    for j in jobs:
        occ = run.traj.steps_of(j.index)
        assert j.steps == (occ[-1:] if j.setting == "single" else occ)
        assert j.start == max(c for c in run.checkpoints if c <= j.steps[0])
        for t in j.steps:
            assert j.index in run.traj.batches[t]
    chunks = chunks_of(jobs, 3)
    assert sorted(k for c in chunks for k in c) == list(range(len(jobs)))
    for c in chunks:
        assert len(c) <= 3 and len({jobs[k].start for k in c}) == 1


def test_nothing_removed_is_exactly_zero(run_every4):
    run = run_every4
    i = int(run.traj.batches[5][0])
    empty = [Job(i, "single", "keep", [], 0), Job(i, "all", "renormalize", [], 4)]
    for job in empty:
        real = Job(i, "single", "keep", [5], job.start)
        d = batched_delta(run, [job, real], torch.float64)
        assert d.shape == (2, 1 + run.task.x_val.shape[0])
        assert np.all(d[0] == 0.0), f"a copy with nothing removed differs by {np.abs(d[0]).max():.3e}"
        assert np.abs(d[1]).max() > 0
    # the naive reference with nothing removed reproduces θ_T bit for bit
    assert np.all(naive_delta(run, Job(i, "single", "keep", [], 0)) == 0.0)


def test_removal_from_a_step_without_the_point_is_refused(run_epoch):
    run = run_epoch
    i = int(run.traj.batches[3][0])
    t = next(t for t in range(run.T) if i not in run.traj.batches[t])
    with pytest.raises(DveError, match="not in the batch"):
        run.traj.weights(t, [i])
    with pytest.raises(DveError, match="not in the batch"):
        batched_delta(run, [Job(i, "single", "keep", [t], run.nearest_checkpoint(t))])


def test_bad_points_and_removals(run_epoch):
    run = run_epoch
    n = run.task.n_train
    with pytest.raises(DveError, match=str(n)):
        make_jobs(run, np.array([n]), ["single"], ["keep"])
    with pytest.raises(DveError, match="outside the training set"):
        replay(run, removals={2: [n]})
    with pytest.raises(DveError, match="empties the batch"):
        run.traj.weights(2, run.traj.batches[2])
    with pytest.raises(DveError, match="only"):
        select_points(run, n + 1, "uniform", seed=0)


def test_missing_checkpoint_names_the_fix(tmp_path):
    root = tmp_path / "runs"
    path = run_training(compose(tiny_overrides(root, "trajectory.checkpoint_every=4")))
    run = TrainedRun.load(path)
    assert 5 not in run.checkpoints
    with pytest.raises(ArtifactError, match="checkpoint_every") as exc:
        replay(run, start=5)
    assert "\n" not in str(exc.value)
    # a checkpoint deleted from a finished run: the manifest names it before anything is read
    ckpt_path(path, 8).unlink()
    with pytest.raises(ArtifactError, match=r"step_0000008\.safetensors is missing") as exc:
        TrainedRun.load(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("spec", ["3/2", "a/b", "1/0", "-1/2", "1"])
def test_bad_shard_specs(spec):
    with pytest.raises(DveError) as exc:
        parse_shard(spec)
    msg = str(exc.value)
    assert "\n" not in msg and "i/n" in msg


def test_good_shard_specs():
    assert parse_shard(None) == (0, 1)
    assert parse_shard("1/3") == (1, 3)


def _cfg(root, *extra):
    return compose(tiny_overrides(root, "tsloo.n_points=6", "tsloo.chunk_size=2",
                                  "tsloo.conventions=[keep,renormalize]", *extra))


def test_shards_merge_to_the_unsharded_result(run_every4, tmp_path):
    run = run_every4
    cfg = _cfg(tmp_path / "sharded")
    p0 = run_tsloo(cfg, run, shard="0/2")
    assert not (p0 / artifacts.DONE).is_file(), "DONE written after only one of two shards"
    assert not (p0 / "delta.npy").is_file()
    with pytest.raises(ArtifactError):
        load_ground_truth(p0)
    p1 = run_tsloo(cfg, run, shard="1/2")
    assert p1 == p0 and (p0 / artifacts.DONE).is_file()
    jobs, merged = load_ground_truth(p0)
    assert len(jobs) == 24 and len(chunks_of(make_jobs(run, jobs["index"].unique(), ["single", "all"],
                                                           ["keep", "renormalize"]), 2)) > 2
    whole_path = run_tsloo(_cfg(tmp_path / "whole"), run)
    jobs_w, whole = load_ground_truth(whole_path)
    assert jobs_w.equals(jobs)
    scale = np.abs(whole).max()
    assert scale > 0
    assert np.abs(merged - whole).max() <= REL_ATOL * scale


def test_resume_after_partial_progress(run_every4, tmp_path):
    run = run_every4
    cfg = _cfg(tmp_path / "runs")
    path = run_tsloo(cfg, run)
    _, full = load_ground_truth(path)
    part = path / "part-0-of-1"
    done = np.load(part / "done.npy")
    done[len(done) // 2 :] = False  # interrupted half-way
    np.save(part / "done.npy", done)
    delta = np.load(part / "delta.npy")
    delta[~done] = 0.0
    np.save(part / "delta.npy", delta)
    (path / artifacts.DONE).unlink()
    (path / "delta.npy").unlink()
    assert run_tsloo(cfg, run) == path
    assert (path / artifacts.DONE).is_file()
    assert np.load(part / "done.npy").all()
    _, resumed = load_ground_truth(path)
    np.testing.assert_array_equal(resumed, full)


def test_finished_run_is_reused(run_epoch, tmp_path):
    run = run_epoch
    cfg = _cfg(tmp_path / "runs")
    path = run_tsloo(cfg, run)
    stamp = (path / "delta.npy").stat().st_mtime_ns
    # a finished run that verifies is reused as is (a damaged one, e.g. with a file deleted,
    # is rebuilt: tests/reliability/test_manifest.py)
    assert run_tsloo(cfg, run) == path
    assert (path / "delta.npy").stat().st_mtime_ns == stamp
