"""Influence function, TracIn and gradient dot product against their definitions (float64,
a 27-parameter classifier trained through the real pipeline; references by plain autograd
at θ recomputed by their own SGD loop).

* influence: (1/n) g_z(θ_T)ᵀ (H + δI)⁻¹ u with H the exact Hessian of the mean training
  loss, solved densely;
* TracIn: Σ_{c<T} η_c g_z(θ_c)ᵀ u(θ_c) over the recorded checkpoints, the query gradient
  recomputed at each;
* grad-dot: g_z(θ_T)ᵀ u.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle_runs import Flat, classifier_task, sgd_iterates, train

from dve_repro.baselines import grad_dot, influence_function, tracin
from dve_repro.unroll import query_gradients

# Dot products and a 27 × 27 solve in float64 (measured agreement ~1e-14 relative); CG is
# run to a relative residual of 1e-12, which bounds its error at about cond(H + δI)·1e-12.
DOT_RTOL = 1e-10
IF_RTOL = 1e-7
DAMPING = 0.3  # the Hessian at θ_T is indefinite here (λ_min ≈ −0.17): δ makes H + δI definite
K = 3  # validation points used as separate queries


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Plain SGD, lr changing every step, T = 12, checkpoints 0, 3, 6, 9, 12."""
    return train(
        tmp_path_factory.mktemp("baselines"),
        classifier_task(seed=1),
        "optim.lr=0.5",
        "schedule=warmup_cosine",
        "schedule.warmup_steps=4",
        "train.batch_size=8",
        "train.epochs=3",
    )


@pytest.fixture(scope="module")
def ref(run):
    thetas = sgd_iterates(run)
    flat = Flat(run.task, run.final_params())
    task = run.task
    x_tr, y_tr = task.x_train, task.y_train

    def queries(theta):  # [p, 1 + K]
        per = flat.grad(theta, task.x_val[:K], task.y_val[:K], mean=False)
        return torch.cat([flat.grad(theta, task.x_val, task.y_val)[None], per]).T

    return {
        "thetas": thetas,
        "flat": flat,
        "queries": queries,
        "G": lambda theta: flat.grad(theta, x_tr, y_tr, mean=False),
    }


def _close(got, want, rtol, what):
    want = np.asarray(want)
    scale = float(np.abs(want).max())
    assert scale > 0, f"{what}: the reference is all zeros"
    err = float(np.abs(np.asarray(got) - want).max())
    assert err <= rtol * scale, f"{what}: max |Δ| {err:.3e} vs scale {scale:.3e}"


def _q(run):
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    return {k: v[: 1 + K] for k, v in q.items()}


def test_grad_dot_is_the_final_gradient_inner_product(run, ref):
    theta = ref["thetas"][-1]
    want = (ref["G"](theta) @ ref["queries"](theta)).numpy()
    got = grad_dot(run, _q(run))
    assert got.shape == (run.task.n_train, 1 + K)
    _close(got, want, DOT_RTOL, "grad-dot")


def test_tracin_sums_over_checkpoints_before_T(run, ref):
    cs = [c for c in run.checkpoints if c < run.T]
    assert cs == [0, 3, 6, 9]
    want = sum(
        float(run.traj.lrs[c]) * (ref["G"](ref["thetas"][c]) @ ref["queries"](ref["thetas"][c]))
        for c in cs
    )
    got = tracin(run, run.task.x_val, run.task.y_val, K)
    _close(got, want.numpy(), DOT_RTOL, "tracin")
    # it is not the final-model dot product rescaled (the checkpoints matter)
    final = (ref["G"](ref["thetas"][-1]) @ ref["queries"](ref["thetas"][-1])).numpy()
    assert np.abs(np.corrcoef(final[:, 0], got[:, 0])[0, 1]) < 0.999


def test_influence_function_is_a_damped_dense_solve(run, ref):
    theta = ref["thetas"][-1]
    flat, task = ref["flat"], run.task
    H = flat.hessian(theta, task.x_train, task.y_train)
    A = H + DAMPING * torch.eye(H.shape[0], dtype=torch.float64)
    eig = torch.linalg.eigvalsh(A)
    assert eig.min() > 0, "H + δI must be positive definite for CG"
    U = ref["queries"](theta)
    want = (ref["G"](theta) @ torch.linalg.solve(A, U)).numpy() / task.n_train
    got, diag = influence_function(run, _q(run), DAMPING, iters=200, tol=1e-12)
    assert diag["cg_rel_residual"] <= 1e-12
    _close(got, want, IF_RTOL, "influence")
    # another damping gives another answer: the check sees δ
    other = (
        ref["G"](theta)
        @ torch.linalg.solve(H + 2 * DAMPING * torch.eye(H.shape[0], dtype=torch.float64), U)
    ).numpy()
    assert np.abs(other / task.n_train - want).max() > 1e-2 * np.abs(want).max()


def test_a_memory_capped_chunk_gives_the_same_baselines(run, ref, monkeypatch):
    """``baselines.CHUNK_BYTES`` small enough to take one training point per chunk: the dot
    products and the Hessian-vector products only regroup their sums (equal to rounding), and
    the CG solve still matches the dense one."""
    from dve_repro import baselines

    before = grad_dot(run, _q(run)), influence_function(run, _q(run), DAMPING, iters=200, tol=1e-12)[0]
    assert baselines.chunk_size(run.task, 1 + K, 512) == 512  # a classifier's logits never bind
    monkeypatch.setattr(baselines, "CHUNK_BYTES", 1)
    assert baselines.chunk_size(run.task, 1 + K, 512) == 1
    after = grad_dot(run, _q(run)), influence_function(run, _q(run), DAMPING, iters=200, tol=1e-12)[0]
    _close(after[0], before[0], DOT_RTOL, "grad-dot in chunks of one")
    _close(after[1], before[1], IF_RTOL, "influence in chunks of one")
    theta = ref["thetas"][-1]
    _close(after[0], (ref["G"](theta) @ ref["queries"](theta)).numpy(), DOT_RTOL, "grad-dot")


def test_chunk_size_caps_a_language_models_logits():
    """The Pythia vocabulary at 16 tokens in float64, five queries: 8 sequences per 2 GiB."""
    from types import SimpleNamespace

    from dve_repro.baselines import chunk_size

    lm = SimpleNamespace(kind="lm", n_classes=50304, x_train=torch.zeros(160, 16, dtype=torch.long),
                         weight_dtype=torch.float64)
    assert chunk_size(lm, 5, 512) == (2 << 30) // (50304 * 16 * 8 * 5 * 8) == 8
    assert chunk_size(lm, 5, 4) == 4  # never more than asked
    huge = SimpleNamespace(kind="lm", n_classes=50304, x_train=torch.zeros(1, 4096, dtype=torch.long),
                           weight_dtype=torch.float64)
    assert chunk_size(huge, 5, 512) == 1  # at least one point
