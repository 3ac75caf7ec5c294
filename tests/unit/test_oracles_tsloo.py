"""Ground-truth retraining beyond plain SGD: the batched fast path against the naive replay
with momentum + weight decay + clipping, AdamW + clipping, and on a tiny GPT-NeoX; and TSLOO
itself (sign, removal step, both conventions) against a from-scratch retraining by autograd.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle_runs import Flat, classifier_task, lm_task, sgd_iterates, train

from dve_repro.tsloo import batched_delta, chunks_of, make_jobs, naive_delta, select_points

# Batched (vmap over copies, differenced against a reference copy) vs naive (one replay per
# job): the same float64 arithmetic up to summation order; measured ~1e-15 relative, so 1e-10
# of max |delta| is rounding only. From-scratch vs replay: same algebra, other code, 1e-9.
BATCHED_RTOL = 1e-10
SCRATCH_RTOL = 1e-9


def _assert_close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    scale = float(np.abs(want).max())
    assert scale > 0, f"{what}: the reference deltas are all zero"
    err = float(np.abs(got - want).max())
    assert err <= rtol * scale, f"{what}: max |Δ| {err:.3e} vs max |delta| {scale:.3e}"


RUNS = {
    "sgd-momentum-wd-clip": (
        classifier_task,
        ("optim.momentum=0.9", "optim.weight_decay=0.01", "optim.grad_clip=0.5", "optim.lr=0.3"),
    ),
    "adamw-clip": (
        classifier_task,
        (
            "optim=adamw",
            "optim.lr=0.05",
            "optim.grad_clip=0.5",
            "schedule=warmup_cosine",
            "schedule.warmup_steps=3",
        ),
    ),
    "lm-adamw": (
        lm_task,
        ("optim=adamw", "optim.lr=0.01", "optim.grad_clip=1.0", "train.batch_size=4"),
    ),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_batched_equals_naive_beyond_plain_sgd(tmp_path, name):
    make, extra = RUNS[name]
    task = make()
    bs = ["train.batch_size=8"] if not any(e.startswith("train.batch_size") for e in extra) else []
    run = train(tmp_path, task, *bs, *extra)
    assert run.cfg.optim.grad_clip > 0
    points = select_points(run, 3, "uniform", seed=2)
    jobs = make_jobs(run, points, ["single", "all"], ["keep", "renormalize"])
    assert len({j.start for j in jobs}) > 1, "jobs should start from different checkpoints"
    got = np.empty((len(jobs), 1 + task.x_val.shape[0]))
    for ids in chunks_of(jobs, 64):
        got[ids] = batched_delta(run, [jobs[j] for j in ids])
    want = np.stack([naive_delta(run, j) for j in jobs])
    _assert_close(got, want, BATCHED_RTOL, name)
    # the four (setting, convention) variants of a point are different numbers
    assert len(np.unique(np.round(want[:, 0], 14))) > len(points)


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    return train(
        tmp_path_factory.mktemp("scratch"),
        classifier_task(seed=2),
        "optim.lr=0.5",
        "train.batch_size=8",
        "schedule=warmup_cosine",
        "schedule.warmup_steps=3",
    )


def scratch_delta(run, removed: dict[int, int], renormalize: bool) -> np.ndarray:
    """L(θ'_T) − L(θ_T) per validation point, θ' retrained from θ_0 by plain autograd SGD."""
    task, traj = run.task, run.traj
    flat = Flat(task, run.final_params())
    base = sgd_iterates(run)[-1]
    if not renormalize:
        theta = sgd_iterates(run, removed)[-1]
    else:
        theta = flat.vec(run.load_params(0)[0])
        for t in range(run.T):
            batch = traj.batches[t]
            x, y = task.batch(batch)
            keep = torch.ones(len(batch), dtype=torch.float64)
            if t in removed:
                keep[torch.as_tensor(np.flatnonzero(batch == removed[t]))] = 0.0
            vv = theta.detach().requires_grad_(True)
            g = torch.autograd.grad((flat.losses(vv, x, y) * keep).sum() / keep.sum(), vv)[0]
            theta = (theta - float(traj.lrs[t]) * g).detach()
    with torch.no_grad():
        d = flat.losses(theta, task.x_val, task.y_val) - flat.losses(base, task.x_val, task.y_val)
    return torch.cat([d.mean()[None], d]).numpy()


def test_tsloo_equals_retraining_from_scratch(sgd_run):
    run = sgd_run
    points = select_points(run, 4, "uniform", seed=5)
    jobs = make_jobs(run, points, ["single", "all"], ["keep", "renormalize"])
    got = np.empty((len(jobs), 1 + run.task.x_val.shape[0]))
    for ids in chunks_of(jobs, 64):
        got[ids] = batched_delta(run, [jobs[j] for j in ids])
    occ = {int(i): [t for t, b in enumerate(run.traj.batches) if i in b] for i in points}
    want = []
    for j in jobs:
        steps = [occ[j.index][-1]] if j.setting == "single" else occ[j.index]
        assert j.steps == steps  # single-epoch removal is the last occurrence
        removed = dict.fromkeys(steps, j.index)
        want.append(scratch_delta(run, removed, j.convention == "renormalize"))
    _assert_close(got, np.stack(want), SCRATCH_RTOL, "batched vs from-scratch TSLOO")


def test_selected_points_are_distinct_and_used(sgd_run):
    used = set(np.concatenate(sgd_run.traj.batches).tolist())
    for how in ("uniform", "balanced"):
        for seed in range(5):
            pts = select_points(sgd_run, 20, how, seed)
            assert len(pts) == 20 and len(set(pts.tolist())) == 20, f"{how}: points repeat: {pts}"
            assert set(pts.tolist()) <= used
