"""``unroll.unrolled_scores`` for every curvature against an explicit product of per-step
matrices (float64, a 27-parameter classifier trained through the real pipeline).

The reference recomputes θ_t by its own SGD loop, builds each step's matrix
I − η_t (C_t + λI) densely (exact Hessian by autograd; Gauss-Newton from the logit Jacobian;
empirical Fisher from one-at-a-time gradients; Monte-Carlo Fisher from gradients at labels
drawn with the documented seed) and scores step t's points as w_t g_t(z)ᵀ A_{t+1} ⋯ A_{T−1} u
with w_t = η_t/|B_t| (SPEC §2; the matrices are symmetric, so the transpose reverses the order).

For the exact (``hessian``) case a second reference skips the SPEC's formula altogether: it
differentiates the SGD update θ ↦ θ − η(∇_θ Σ_j w_j ℓ_j + λθ) by autograd, in θ and in the
batch's loss weights w, and chains those Jacobians from the removal to the final loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle_runs import Flat, classifier_task, curvature_matrix, query_matrix, sgd_iterates, train

from dve_repro.errors import DveError
from dve_repro.unroll import query_gradients, unrolled_scores

# The matrix-free path (jvp/vjp) and the dense products round differently; both are float64
# on O(1) numbers over 12 steps (measured ≤ 5e-16 relative for every curvature and for the
# autograd Jacobians of the update), so 1e-10 relative leaves room for rounding only. A
# curvature term off by a factor, a sign or a step moves scores by > 1e-3.
UNROLL_RTOL = 1e-10
MC_SAMPLES, MC_SEED = 2, 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Plain SGD with weight decay, warm-up + cosine lr (every step's η differs), batches of
    8, 8, 8, 2 over 26 points, 3 epochs (T = 12), checkpoints every 3 steps."""
    task = classifier_task()
    return train(
        tmp_path_factory.mktemp("unroll"),
        task,
        "optim.lr=0.8",
        "optim.weight_decay=0.03",
        "schedule=warmup_cosine",
        "schedule.warmup_steps=3",
        "train.batch_size=8",
        "train.epochs=3",
    )


@pytest.fixture(scope="module")
def thetas(run):
    return sgd_iterates(run)


def explicit_scores(run, thetas, kind: str) -> np.ndarray:
    task, traj = run.task, run.traj
    flat = Flat(task, run.final_params())
    wd = run.cfg.optim.weight_decay
    V = query_matrix(flat, thetas[-1], task)
    p = V.shape[0]
    offsets = traj.offsets()
    out = np.zeros((int(offsets[-1]), V.shape[1]))
    for t in range(run.T - 1, -1, -1):
        x, y = task.batch(traj.batches[t])
        lr, n = float(traj.lrs[t]), x.shape[0]
        G = flat.grad(thetas[t], x, y, mean=False)
        out[offsets[t] : offsets[t + 1]] = (lr / n * G @ V).numpy()
        C = curvature_matrix(flat, thetas[t], x, y, kind, t, MC_SAMPLES, MC_SEED)
        A = torch.eye(p, dtype=torch.float64) * (1 - lr * wd)
        if C is not None:
            A = A - lr * C
        V = A @ V
    return out


def test_recorded_run_is_the_sgd_the_reference_recomputes(run, thetas):
    flat = Flat(run.task, run.final_params())
    assert run.T == 12 and sorted(set(run.traj.sizes().tolist())) == [2, 8]
    assert len(set(np.round(run.traj.lrs, 12))) > 6, "the lr must change from step to step"
    for t in run.checkpoints:
        torch.testing.assert_close(
            flat.vec(run.load_params(t)[0]), thetas[t], rtol=1e-12, atol=1e-14
        )


def test_query_gradients_equal_autograd(run, thetas):
    flat = Flat(run.task, run.final_params())
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    got = torch.stack(
        [flat.vec({k: v[i] for k, v in q.items()}) for i in range(1 + run.task.x_val.shape[0])]
    ).T
    torch.testing.assert_close(
        got, query_matrix(flat, thetas[-1], run.task), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("curvature", ["hessian", "gn", "ef", "mc", "none"])
def test_unrolled_scores_equal_explicit_product(run, thetas, curvature):
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    got = unrolled_scores(run, q, curvature, mc_samples=MC_SAMPLES, mc_seed=MC_SEED)
    want = explicit_scores(run, thetas, curvature)
    scale = float(np.abs(want).max())
    assert scale > 0
    err = float(np.abs(got - want).max())
    assert err <= UNROLL_RTOL * scale, (
        f"unrolled-{curvature}: max |Δ| {err:.3e} vs scale {scale:.3e}"
    )
    if curvature != "none":  # the curvature term is not negligible here, so the check has teeth
        assert float(np.abs(want - explicit_scores(run, thetas, "none")).max()) > 1e-3 * scale


def test_curvatures_differ_from_each_other(run, thetas):
    """Hessian, GN, EF and MC are different matrices on this problem (else the tests above
    could not tell one substitution from another)."""
    s = {c: explicit_scores(run, thetas, c) for c in ("hessian", "gn", "ef")}
    scale = float(np.abs(s["hessian"]).max())
    assert np.abs(s["hessian"] - s["gn"]).max() > 1e-4 * scale
    assert np.abs(s["gn"] - s["ef"]).max() > 1e-4 * scale


def test_unrolling_refuses_momentum(tmp_path):
    run = train(
        tmp_path, classifier_task(), "optim.momentum=0.9", "train.epochs=1", "train.batch_size=8"
    )
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    with pytest.raises(DveError, match="plain-SGD"):
        unrolled_scores(run, q, "ef")


def _sgd_step(flat: Flat, x, y, lr: float, wd: float):
    """The recorded SGD step as a function of θ [p] and the batch's loss weights w [|B|]:
    θ − η (∇_θ Σ_j w_j ℓ_j(θ) + λ θ); training uses w_j = 1/|B|."""

    def step(theta, w):
        g = torch.autograd.grad((flat.losses(theta, x, y) * w).sum(), theta, create_graph=True)[0]
        return theta - lr * (g + wd * theta)

    return step


def test_hessian_unroll_equals_product_of_step_jacobians(run, thetas):
    """The exact first-order effect of leaving a point out, without the SPEC's formula: each
    step's Jacobian in θ and in the batch weights by autograd of the update itself, chained
    from the removal (Δw_j = −1/|B|) to the final validation loss (removal minus kept)."""
    task, traj = run.task, run.traj
    flat = Flat(task, run.final_params())
    wd = run.cfg.optim.weight_decay
    V = query_matrix(flat, thetas[-1], task)  # [p, Q]: ∂L_q/∂θ_T
    offsets = traj.offsets()
    want = np.zeros((int(offsets[-1]), V.shape[1]))
    for t in range(run.T - 1, -1, -1):
        x, y = task.batch(traj.batches[t])
        n = x.shape[0]
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        J_theta, J_w = torch.autograd.functional.jacobian(
            _sgd_step(flat, x, y, float(traj.lrs[t]), wd), (thetas[t], w)
        )  # [p, p], [p, |B|]
        want[offsets[t] : offsets[t + 1]] = (-J_w / n).T.numpy() @ V.numpy()
        V = J_theta.T @ V
    q = query_gradients(run, run.final_params(), task.x_val, task.y_val)
    got = unrolled_scores(run, q, "hessian")
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= UNROLL_RTOL * scale, f"max |Δ| {err:.3e} vs scale {scale:.3e}"
