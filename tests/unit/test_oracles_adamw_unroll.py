"""AdamW unrolling (``unroll.unrolled_scores`` on an AdamW run, SPEC §2 "Adam") for every
curvature against an explicit product of dense Jacobians of the whole optimizer state map
(float64, a 27-parameter classifier trained through the real pipeline, clipping active on
some steps).

The reference never calls the code it checks: it recomputes θ_t, m_t, v_t by its own AdamW
loop on flat vectors (checked against the recorded checkpoints), writes the step as
F_t(θ, m, v, g) ↦ (θ', m', v') with g the pre-clip batch gradient, and takes by autograd
A_t = ∂F_t/∂(θ, m, v) [3p, 3p] and B_t = ∂F_t/∂g [3p, p]. With the curvature C_t standing in
for ∂g/∂θ, step t's Jacobian is J_t = A_t + B_t [C_t 0 0]; leaving point z out of step t
moves the state by −(1/|B_t|) B_t g_t(z), and its first-order effect on the final validation
loss is (u, 0, 0)ᵀ J_{T−1} ⋯ J_{t+1} (−(1/|B_t|) B_t g_t(z)) (removal minus kept).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle_runs import Flat, classifier_task, curvature_matrix, query_matrix, train

from dve_repro.unroll import query_gradients, unrolled_scores

# Dense products of 81 × 81 matrices against the matrix-free adjoint, float64 on O(1)
# numbers over 12 steps: rounding only (measured ~1e-15 relative). A curvature term, a bias
# correction or a clipping derivative that is off moves scores by far more than 1e-10.
UNROLL_RTOL = 1e-10
MC_SAMPLES, MC_SEED = 2, 5
CLIP = 0.6

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """AdamW (wd 0.1, betas 0.9/0.95), warm-up + cosine lr, clipping at CLIP, batches of
    8, 8, 8, 2 over 26 points, 3 epochs (T = 12), checkpoints every 3 steps."""
    return train(
        tmp_path_factory.mktemp("adamw_unroll"),
        classifier_task(seed=2),
        "optim=adamw",
        "optim.lr=0.05",
        f"optim.grad_clip={CLIP}",
        "schedule=warmup_cosine",
        "schedule.warmup_steps=3",
        "train.batch_size=8",
        "train.epochs=3",
    )


def adamw_step(cfg, lr: float, step: int):
    """F_t(θ, m, v, g) → (θ', m', v') on flat vectors, written from the AdamW definition
    (decoupled decay, bias corrections with the step counted from 1) and clip_grad_norm_."""
    b1, b2 = cfg.betas
    bc1, bc2 = 1 - b1 ** (step + 1), 1 - b2 ** (step + 1)

    def F(theta, m, v, g):
        if cfg.grad_clip > 0:
            g = g * torch.clamp(cfg.grad_clip / (torch.linalg.vector_norm(g) + 1e-6), max=1.0)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        theta = theta * (1 - lr * cfg.weight_decay) - lr / bc1 * m / (torch.sqrt(v / bc2) + cfg.eps)
        return torch.cat([theta, m, v])

    return F


def _part(state, prefix: str):
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


@pytest.fixture(scope="module")
def ref(run):
    """Per step: θ_t, the per-sample gradients G_t [B, p], A_t, B_t and whether it clipped."""
    task, traj, cfg = run.task, run.traj, run.cfg.optim
    params0, _ = run.load_params(0)
    flat = Flat(task, params0)
    p = sum(flat.sizes)
    theta, m, v = (
        flat.vec(params0),
        torch.zeros(p, dtype=torch.float64),
        torch.zeros(p, dtype=torch.float64),
    )
    steps = []
    for t in range(run.T):
        if t in run.checkpoints:  # the recorded (θ, m, v) are the ones recomputed here
            saved, state = run.load_params(t)
            for mine, theirs in ((theta, saved), (m, _part(state, "m")), (v, _part(state, "v"))):
                torch.testing.assert_close(mine, flat.vec(theirs), rtol=1e-12, atol=1e-14)
        x, y = task.batch(traj.batches[t])
        g = flat.grad(theta, x, y)
        F = adamw_step(cfg, float(traj.lrs[t]), t)
        *A, B = torch.autograd.functional.jacobian(F, (theta, m, v, g))
        steps.append(
            {
                "theta": theta,
                "G": flat.grad(theta, x, y, mean=False),
                "A": torch.cat(A, 1),
                "B": B,
                "clipped": float(torch.linalg.vector_norm(g)) > cfg.grad_clip,
                "m": m,
                "v": v,
            }
        )
        out = F(theta, m, v, g)
        theta, m, v = out[:p], out[p : 2 * p], out[2 * p :]
    torch.testing.assert_close(theta, flat.vec(run.final_params()), rtol=1e-12, atol=1e-14)
    return {"flat": flat, "p": p, "steps": steps, "theta_T": theta}


def explicit_scores(run, ref, kind: str) -> np.ndarray:
    task, traj = run.task, run.traj
    flat, p = ref["flat"], ref["p"]
    U = query_matrix(flat, ref["theta_T"], task)  # [p, Q]
    lam = torch.cat([U, torch.zeros(2 * p, U.shape[1], dtype=torch.float64)])  # [3p, Q]
    offsets = traj.offsets()
    out = np.zeros((int(offsets[-1]), U.shape[1]))
    for t in range(run.T - 1, -1, -1):
        s = ref["steps"][t]
        x, y = task.batch(traj.batches[t])
        n = x.shape[0]
        out[offsets[t] : offsets[t + 1]] = (-(s["G"] @ s["B"].T) / n @ lam).numpy()
        J = s["A"].clone()
        C = curvature_matrix(flat, s["theta"], x, y, kind, t, MC_SAMPLES, MC_SEED)
        if C is not None:
            J[:, :p] += s["B"] @ C
        lam = J.T @ lam
    return out


def test_reference_sees_clipping_on_some_steps_only(ref):
    clipped = sum(s["clipped"] for s in ref["steps"])
    assert 0 < clipped < len(ref["steps"]), (
        "the oracle must see both the clipped and the free regime"
    )


def test_reference_hessian_jacobian_is_the_composed_step(run, ref):
    """A + B H equals the Jacobian of θ ↦ F(θ, m, v, ∇L_B(θ)) (the reference's own check)."""
    task, traj, flat, p = run.task, run.traj, ref["flat"], ref["p"]
    for t in (0, 5, run.T - 1):
        s = ref["steps"][t]
        x, y = task.batch(traj.batches[t])
        F = adamw_step(run.cfg.optim, float(traj.lrs[t]), t)

        def composed(theta, s=s, x=x, y=y, F=F):
            g = torch.autograd.grad(flat.losses(theta, x, y).mean(), theta, create_graph=True)[0]
            return F(theta, s["m"], s["v"], g)

        want = torch.autograd.functional.jacobian(composed, s["theta"])
        got = s["A"][:, :p] + s["B"] @ flat.hessian(s["theta"], x, y)
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("curvature", ["hessian", "gn", "ef", "mc", "none"])
def test_adamw_unrolled_scores_equal_dense_jacobian_product(run, ref, curvature):
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    got = unrolled_scores(run, q, curvature, mc_samples=MC_SAMPLES, mc_seed=MC_SEED)
    want = explicit_scores(run, ref, curvature)
    scale = float(np.abs(want).max())
    assert scale > 0
    err = float(np.abs(got - want).max())
    assert err <= UNROLL_RTOL * scale, (
        f"adamw unrolled-{curvature}: max |Δ| {err:.3e} vs scale {scale:.3e}"
    )
    if curvature != "none":  # the curvature term is not negligible here, so the check has teeth
        assert float(np.abs(want - explicit_scores(run, ref, "none")).max()) > 1e-3 * scale
