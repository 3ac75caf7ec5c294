"""Ground-truth retraining (TSLOO, SPEC §1): the batched fast path against the naive
reference, exact zero for a copy with nothing removed, sharding/merging/resuming, and
refusal of impossible removals.

Every test uses the seconds-long ``tiny_mlp`` run in float64 (T = 16 steps of 32 points).
"""

from __future__ import annotations

import dataclasses

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
    stacked_mlp_grads,
    update_stack,
    vmap_grads,
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


# ------------------------------------------------------------------ fast paths vs references
def _batched_delta_before(run: TrainedRun, jobs: list[Job]) -> np.ndarray:
    """Frozen copy of ``batched_delta`` as it was before the stack was preallocated and
    updated in place (vmap over copies, a new stack per step): the vmap kernel must give
    these numbers bit for bit, so committed ground truth computed with it stays as it is."""
    from torch.func import functional_call, grad, vmap

    from dve_repro.optim import update

    start, task, traj, cfg = jobs[0].start, run.task, run.traj, run.cfg
    params, state = run.load_params(start)
    stack = {k: v.unsqueeze(0) for k, v in params.items()}
    sstack = {k: v.unsqueeze(0) for k, v in state.items()}

    def weighted_loss(p, x, y, w):
        return (task.per_sample_loss_from_logits(functional_call(task.model, p, (x,)), y) * w).sum()

    grad_fn = vmap(grad(weighted_loss), in_dims=(0, None, None, 0))
    order = sorted(range(len(jobs)), key=lambda j: min(jobs[j].steps, default=run.T))
    joins = [min(jobs[j].steps, default=run.T) for j in order]

    def join(upto, active):
        nonlocal stack, sstack
        new = active
        while new - 1 < len(joins) and joins[new - 1] <= upto:
            new += 1
        stack = {k: torch.cat([v, v[:1].expand(new - active, *v.shape[1:])]) for k, v in stack.items()}
        sstack = {k: torch.cat([v, v[:1].expand(new - active, *v.shape[1:])]) for k, v in sstack.items()}
        return new

    active = 1
    for t in range(start, run.T):
        active = join(t, active)
        batch = traj.batches[t]
        x, y = task.batch(batch)
        n = len(batch)
        W = torch.full((active, n), 1.0 / n, dtype=torch.float64)
        for c, j in enumerate(order, start=1):
            if t in jobs[j].steps:
                pos = torch.as_tensor(np.flatnonzero(batch == jobs[j].index))
                W[c, pos] = 0.0
                if jobs[j].convention == "renormalize":
                    W[c][W[c] > 0] = 1.0 / (n - len(pos))
        grads = grad_fn(stack, x, y, W)
        lr = float(traj.lrs[t])
        stack, sstack = vmap(lambda p, g, s, lr=lr, t=t: update(p, g, s, lr, t, cfg.optim))(stack, grads, sstack)
    join(run.T, active)
    losses = torch.no_grad()(vmap(lambda p: task.per_sample_loss(p, task.x_val, task.y_val)))(stack)
    d = losses[1:] - losses[:1]
    rows = torch.cat([d.mean(dim=1, keepdim=True), d], dim=1).numpy()
    out = np.empty_like(rows)
    out[np.asarray(order)] = rows
    return out


def _all_jobs(run: TrainedRun, n: int = 3) -> list[Job]:
    return make_jobs(run, select_points(run, n, "uniform", seed=1), ["single", "all"], ["keep", "renormalize"])


@pytest.mark.parametrize("which", ["run_epoch", "run_every4"])
def test_vmap_kernel_is_bit_identical_to_the_code_before(request, which):
    run: TrainedRun = request.getfixturevalue(which)
    jobs = _all_jobs(run)
    for c in chunks_of(jobs, 64):
        chunk = [jobs[j] for j in c]
        np.testing.assert_array_equal(batched_delta(run, chunk, kernel="vmap"), _batched_delta_before(run, chunk))


def test_stacked_kernel_equals_vmap_kernel(run_every4):
    run = run_every4
    jobs = _all_jobs(run)
    for c in chunks_of(jobs, 64):
        chunk = [jobs[j] for j in c]
        fast = batched_delta(run, chunk, kernel="stacked")
        ref = batched_delta(run, chunk, kernel="vmap")
        _assert_close(fast, ref, f"stacked vs vmap kernel, start {chunk[0].start}")
    assert stacked_mlp_grads(run.task) is not None, "the tiny MLP should take the stacked kernel"


@pytest.mark.parametrize("start_from_job", [False, True])
def test_same_start_replay_equals_naive(run_every4, start_from_job):
    """The same-start baseline (one replay per job from its own start checkpoint) is the
    naive reference: replay from a checkpoint reproduces the recorded run bit for bit."""
    run = run_every4
    jobs = _all_jobs(run, 2)
    assert any(j.start > 0 for j in jobs)
    base = torch.no_grad()(run.task.per_sample_loss)(run.final_params(), run.task.x_val, run.task.y_val)
    naive = np.stack([naive_delta(run, j, base) for j in jobs])
    same = np.stack([naive_delta(run, j, base, start=j.start if start_from_job else 0) for j in jobs])
    _assert_close(same, naive, "same-start vs naive")


def test_removal_before_the_start_is_refused(run_every4):
    run = run_every4
    job = next(j for j in _all_jobs(run) if j.start > 0)
    with pytest.raises(DveError, match="cannot remove"):
        naive_delta(run, job, start=run.checkpoints[run.checkpoints.index(job.start) + 1])


def test_unknown_kernel_and_stacked_on_another_model_are_refused(run_epoch):
    from dve_repro.tsloo import grads_for

    with pytest.raises(DveError, match="kernel must be one of"):
        grads_for(run_epoch.task, "fused")
    other = dataclasses.replace(run_epoch.task, kind="lm")
    with pytest.raises(DveError, match="needs an MLP classifier"):
        grads_for(other, "stacked")


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "softplus", "sigmoid"])
def test_stacked_grads_equal_vmap_grads(activation):
    """Two hidden layers (the einsum path between hidden layers) and every activation."""
    from dve_repro.config import MLPConfig
    from dve_repro.models import build_model
    from dve_repro.tasks import Task

    model = build_model(MLPConfig(in_features=6, hidden=[5, 4], n_classes=3, activation=activation))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=gen)
    task = Task("classify", model, x, y, x, y, 3, "random")
    P = {k: v.detach().unsqueeze(0) + 0.3 * torch.randn(4, *v.shape, generator=gen, dtype=torch.float64)
         for k, v in model.named_parameters()}
    W = torch.rand(4, 7, generator=gen, dtype=torch.float64)
    fast, ref = stacked_mlp_grads(task)(P, x, y, W), vmap_grads(task)(P, x, y, W)
    assert set(fast) == set(ref)
    for k in ref:
        assert ref[k].abs().max() > 0
        torch.testing.assert_close(fast[k], ref[k], rtol=0, atol=1e-14, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("optim", [
    {"name": "sgd"},
    {"name": "sgd", "momentum": 0.9, "weight_decay": 0.01},
    {"name": "sgd", "momentum": 0.9, "grad_clip": 0.5},
    {"name": "adamw", "weight_decay": 0.1},
    {"name": "adamw", "weight_decay": 0.1, "grad_clip": 0.5},
])
def test_update_stack_is_bit_identical_to_vmapped_update(optim):
    """The in-place / unvmapped step writes exactly the numbers of vmap(optim.update)."""
    from torch.func import vmap

    from dve_repro.config import OptimConfig
    from dve_repro.optim import init_state, update

    cfg = OptimConfig(**optim)
    gen = torch.Generator().manual_seed(4)
    shapes = {"a.weight": (5, 3), "a.bias": (5,)}
    P = {k: torch.randn(6, *s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    G = {k: torch.randn(6, *s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    S = {k: torch.rand(6, *v.shape, generator=gen, dtype=torch.float64)
         for k, v in init_state({k: v[0] for k, v in P.items()}, cfg).items()}
    assert (cfg.name == "sgd" and not cfg.momentum) or S
    want_p, want_s = vmap(lambda p, g, s: update(p, g, s, 0.03, 2, cfg))(P, G, S)
    got_p, got_s = {k: v.clone() for k, v in P.items()}, {k: v.clone() for k, v in S.items()}
    update_stack(got_p, got_s, {k: v.clone() for k, v in G.items()}, 0.03, 2, cfg)
    for k in want_p:
        assert torch.equal(got_p[k], want_p[k]), k
        assert not torch.equal(got_p[k], P[k])
    for k in want_s:
        assert torch.equal(got_s[k], want_s[k]), k
