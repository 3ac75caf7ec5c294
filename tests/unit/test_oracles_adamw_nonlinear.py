"""The nonlinear-map AdamW unrolling (``adamw_unrolled_scores(..., nonlinear=τ)``) against
retraining where it must be exact: a loss that is linear in θ.

With logits = W x + b and ℓ = −logit_y, every per-sample gradient is a constant, so leaving a
point out of step t changes nothing but that step's batch gradient: the whole effect is
AdamW's own map (clipping, bias corrections, decoupled decay, and the update m̂/(√v̂+ε) along
the EMA tail of the removal's moment perturbation), and the change of the (linear)
validation loss is u · (θ_T without the point − θ_T). The reference retrains every
occurrence by its own AdamW loop on flat vectors (checked against the recorded final
parameters) and never calls the code it checks. The first-order map misses Adam's
nonlinearity here by a wide margin, so the test has teeth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from oracle_runs import Flat, query_matrix, train
from test_oracles_adamw_unroll import adamw_step

from dve_repro.config import MLPConfig
from dve_repro.models import build_model
from dve_repro.tasks import Task
from dve_repro.unroll import adamw_unrolled_scores, query_gradients

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CLIP = 1.0


class LinearLossTask(Task):
    """ℓ(θ, (x, y)) = −(W x + b)_y: gradients independent of θ, Hessian zero."""

    def per_sample_loss_from_logits(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -logits.gather(1, y[:, None]).squeeze(1)


def linear_task(n_train: int = 20, n_val: int = 4, d: int = 3, classes: int = 3) -> LinearLossTask:
    model = build_model(MLPConfig(in_features=d, hidden=[], n_classes=classes, init_seed=4))
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n_train + n_val, d, generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n_train + n_val,), generator=gen)
    return LinearLossTask("classify", model, x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes,
                          "synthetic linear-loss classification")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """AdamW (wd 0.1, betas 0.9/0.95), warm-up + cosine, clipping at CLIP, batches 6, 6, 6, 2
    over 20 points, 2 epochs (T = 8), checkpoints every 3 steps."""
    return train(tmp_path_factory.mktemp("adamw_nl"), linear_task(), "optim=adamw", "optim.lr=0.05",
                 f"optim.grad_clip={CLIP}", "schedule=warmup_cosine", "schedule.warmup_steps=2",
                 "train.batch_size=6", "train.epochs=2")


def retrained_effects(run) -> tuple[np.ndarray, bool]:
    """[N_occ, Q]: u_q · (θ_T without occurrence r − θ_T) by an own AdamW loop, and whether
    the clip was active on some steps but not all."""
    task, traj, cfg = run.task, run.traj, run.cfg.optim
    params0, _ = run.load_params(0)
    flat = Flat(task, params0)
    theta0 = flat.vec(params0)
    G = flat.grad(theta0, task.x_train, task.y_train, mean=False)  # [N, p], constant in θ

    def final(removed: tuple[int, int] | None) -> torch.Tensor:
        theta, m, v = theta0.clone(), torch.zeros_like(theta0), torch.zeros_like(theta0)
        p = theta.numel()
        for t in range(run.T):
            batch = torch.as_tensor(np.asarray(traj.batches[t]).copy())
            w = torch.full((len(batch),), 1.0 / len(batch), dtype=torch.float64)
            if removed is not None and removed[1] == t:
                w[removed[0]] = 0.0  # keep convention: the denominator stays |B_t|
            out = adamw_step(cfg, float(traj.lrs[t]), t)(theta, m, v, w @ G[batch])
            theta, m, v = out[:p], out[p : 2 * p], out[2 * p :]
        return theta

    full = final(None)
    torch.testing.assert_close(full, flat.vec(run.final_params()), rtol=1e-12, atol=1e-12)
    U = query_matrix(flat, full, task)  # [p, Q]
    offsets = traj.offsets()
    out = np.zeros((int(offsets[-1]), U.shape[1]))
    for t in range(run.T):
        for pos in range(len(traj.batches[t])):
            out[offsets[t] + pos] = ((final((pos, t)) - full) @ U).numpy()
    norms = [float(torch.linalg.vector_norm(G[torch.as_tensor(np.asarray(b).copy())].mean(0))) for b in traj.batches]
    return out, any(n > CLIP for n in norms) and not all(n > CLIP for n in norms)


@pytest.fixture(scope="module")
def truth(run):
    return retrained_effects(run)


def test_reference_sees_clipping_on_some_steps_only(truth):
    assert truth[1], "the oracle must see both the clipped and the free regime"


@pytest.mark.parametrize("curvature", ["hessian", "none"])
def test_nonlinear_map_equals_retraining_on_a_linear_loss(run, truth, curvature):
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    want = truth[0]
    scale = float(np.abs(want).max())
    got = adamw_unrolled_scores(run, q, curvature, nonlinear=0.0)
    err = float(np.abs(got - want).max())
    assert err <= 1e-10 * scale, f"nonlinear map ({curvature}): max |Δ| {err:.3e} vs scale {scale:.3e}"
    first_order = adamw_unrolled_scores(run, q, curvature)
    assert float(np.abs(first_order - want).max()) > 1e-2 * scale  # Adam's nonlinearity is not small here


def test_threshold_keeps_the_large_relative_changes_only(run, truth):
    """τ = 0.5 carries fewer tail coordinates; every change it leaves out is below τ of v, so the
    result stays between the first-order map and exact retraining in error."""
    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    want = truth[0]
    err = {tau: float(np.abs(adamw_unrolled_scores(run, q, "none", nonlinear=tau) - want).max())
           for tau in (0.0, 0.5)}
    first = float(np.abs(adamw_unrolled_scores(run, q, "none") - want).max())
    assert err[0.0] < err[0.5] < first


def test_negative_threshold_is_refused(run):
    from dve_repro.errors import DveError

    q = query_gradients(run, run.final_params(), run.task.x_val, run.task.y_val)
    with pytest.raises(DveError, match="threshold"):
        adamw_unrolled_scores(run, q, "none", nonlinear=-1.0)
