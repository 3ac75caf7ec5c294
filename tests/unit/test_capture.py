"""Curvature factor rows (Gauss-Newton, Monte-Carlo Fisher) against explicit matrices, and
the resumable gradient store."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
from torch.func import jacrev

from dve_repro.capture import Featurizer, GradientStore
from dve_repro.config import MLPConfig, ProjectionConfig
from dve_repro.errors import ArtifactError, DveError
from dve_repro.grads import flatten_blocks, gradient_layout, per_sample_grads_naive, to_blocks
from dve_repro.models import build_model
from dve_repro.projection import Projector
from dve_repro.tasks import Task

C = 4


@pytest.fixture(scope="module")
def task() -> Task:
    model = build_model(MLPConfig(in_features=5, hidden=[6], n_classes=C, activation="tanh", init_seed=3))
    with torch.no_grad():  # sharpen the logits so that the predictive distribution is far from uniform
        for p in model.parameters():
            p.mul_(2.5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (7,), generator=gen)
    return Task("classify", model, x, y, x[:2], y[:2], C, "test task")


def featurizer(task: Task, engine: str, kind: str = "none") -> Featurizer:
    blocks = gradient_layout(task.model)
    return Featurizer(task, blocks, Projector(ProjectionConfig(kind=kind, k_in=3, k_out=2), blocks), engine)


def params_of(task: Task) -> dict:
    return {k: v.detach().clone() for k, v in task.model.named_parameters()}


def jacobian(task: Task, params: dict, xi: torch.Tensor) -> torch.Tensor:
    """∂ logits / ∂ θ for one input, [C, p] in the grads.py layout."""
    jac = jacrev(lambda p: task.logits(p, xi[None])[0])(params)  # {name: [C, *shape]}
    blocks = gradient_layout(task.model)
    return flatten_blocks(to_blocks(jac, blocks), blocks)


@pytest.mark.parametrize("engine", ["hooks", "func"])
def test_gauss_newton_rows_give_the_gn_matrix(task, engine):
    feat = featurizer(task, engine)
    params = params_of(task)
    rows = feat.curvature(params, task.x_train, task.y_train, "gn", 1, 0)
    n, p = task.x_train.shape[0], feat.projector.out_dim
    assert rows.shape == (n * C, p)
    rows = rows.view(n, C, p)
    probs = torch.softmax(task.logits(params, task.x_train), dim=-1).detach()
    assert probs.max() > 0.6  # a non-uniform prediction makes the check sharp
    for i in range(n):
        J = jacobian(task, params, task.x_train[i])
        pi = probs[i]
        gn = J.T @ (torch.diag(pi) - torch.outer(pi, pi)) @ J
        got = rows[i].T @ rows[i]
        torch.testing.assert_close(got, gn, rtol=0, atol=1e-10)
    # one point's rows are not the rows of its true label alone (that would be the empirical Fisher)
    g_true = per_sample_grads_naive(task.per_sample_loss, params, task.x_train[:1], task.y_train[:1], feat.blocks)
    ef = flatten_blocks(g_true, feat.blocks)
    assert not torch.allclose(rows[0].T @ rows[0], ef.T @ ef)


def _reference_mc(task: Task, feat: Featurizer, params: dict, k: int, seed: int) -> torch.Tensor:
    """Independent construction: labels drawn as documented (CPU torch.Generator seeded with
    ``seed``, one torch.multinomial call per sample j), gradients by one-at-a-time autograd."""
    x = task.x_train
    probs = torch.softmax(task.logits(params, x), dim=-1).detach()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = torch.zeros(x.shape[0], k, feat.projector.out_dim, dtype=torch.float64)
    for j in range(k):
        draw = torch.multinomial(probs, 1, generator=gen).view(-1)
        g = flatten_blocks(per_sample_grads_naive(task.per_sample_loss, params, x, draw, feat.blocks), feat.blocks)
        out[:, j] = g / np.sqrt(k)
    return out


@pytest.mark.parametrize("engine", ["hooks", "func"])
def test_monte_carlo_rows_with_a_fixed_seed(task, engine):
    feat = featurizer(task, engine)
    params = params_of(task)
    k, seed = 3, 1234
    rows = feat.curvature(params, task.x_train, task.y_train, "mc", k, seed)
    n, p = task.x_train.shape[0], feat.projector.out_dim
    assert rows.shape == (n * k, p)
    ref = _reference_mc(task, feat, params, k, seed)
    torch.testing.assert_close(rows.view(n, k, p), ref, rtol=0, atol=1e-12)
    # per point: Σ_rows f fᵀ = (1/k) Σ_j g(ỹ_j) g(ỹ_j)ᵀ
    r0 = rows.view(n, k, p)[0]
    g0 = ref[0] * np.sqrt(k)
    torch.testing.assert_close(r0.T @ r0, (g0.T @ g0) / k, rtol=0, atol=1e-12)
    # same seed → same rows, another seed → other labels somewhere
    again = feat.curvature(params, task.x_train, task.y_train, "mc", k, seed)
    torch.testing.assert_close(again, rows, rtol=0, atol=0)
    other = feat.curvature(params, task.x_train, task.y_train, "mc", k, seed + 1)
    assert not torch.allclose(other, rows)


def test_monte_carlo_fisher_converges_to_gauss_newton(task):
    """For softmax cross-entropy the Fisher equals the GN matrix: many MC labels must approach it."""
    feat = featurizer(task, "hooks")
    params = params_of(task)
    copies, k = 1500, 2  # 3,000 independent labels per point from two batched calls
    x, y = task.x_train[:2], task.y_train[:2]
    mc = feat.curvature(params, x.repeat(copies, 1), y.repeat(copies), "mc", k, 7)
    mc = mc.view(copies, 2, k, -1).transpose(0, 1).reshape(2, copies * k, -1) / np.sqrt(copies)
    gn = feat.curvature(params, x, y, "gn", 1, 0).view(2, C, -1)
    for i in range(2):
        a, b = mc[i].T @ mc[i], gn[i].T @ gn[i]
        rel = float((a - b).norm() / b.norm())
        assert rel < 0.1, rel


def test_curvature_rows_under_projection(task):
    """Projected GN rows are P times the unprojected ones (projection is linear)."""
    params = params_of(task)
    raw = featurizer(task, "hooks").curvature(params, task.x_train, task.y_train, "gn", 1, 0)
    feat = featurizer(task, "hooks", "kronecker")
    got = feat.curvature(params, task.x_train, task.y_train, "gn", 1, 0)
    torch.testing.assert_close(got, feat.projector.project_flat(raw), rtol=0, atol=1e-12)


# ----------------------------------------------------------------- GradientStore


def _meta(seed: int = 0, curvature: str = "gn") -> dict:
    proj = {"kind": "dense", "dim": 4, "k_in": 32, "k_out": 16, "seed": seed, "layout": [["l", [3, 5]]]}
    return {"projection": proj, "curvature": curvature}


def test_store_persists_rows_and_done_mask(tmp_path):
    folder = tmp_path / "grads"
    offsets = np.array([0, 2, 5, 6])
    rng = np.random.default_rng(0)
    rows = [torch.from_numpy(rng.normal(size=(b - a, 4))) for a, b in pairwise(offsets)]
    curv = [torch.from_numpy(rng.normal(size=((b - a) * 2, 4))) for a, b in pairwise(offsets)]
    s = GradientStore(folder, offsets, 4, _meta(), rows_per_point=2)
    assert s.T == 3 and not s.done.any()
    s.write(0, rows[0], curv[0])
    s.write(1, rows[1], curv[1])
    s.commit([0, 1])
    s.write(2, rows[2], curv[2])  # written but never committed: not done after a restart
    del s

    again = GradientStore(folder, offsets, 4, _meta(), rows_per_point=2)
    assert again.done.tolist() == [True, True, False]
    assert not again.complete
    np.testing.assert_array_equal(np.asarray(again.G[0:5]), torch.cat(rows[:2]).numpy())
    np.testing.assert_array_equal(np.asarray(again.F[0:10]), torch.cat(curv[:2]).numpy())
    np.testing.assert_array_equal(again.f_offsets(), offsets * 2)
    again.write(2, rows[2], curv[2])
    again.commit([2])
    assert again.complete
    del again

    opened = GradientStore.open_existing(folder)
    assert opened.complete and opened.dim == 4 and opened.rpp == 2
    np.testing.assert_array_equal(np.asarray(opened.G), torch.cat(rows).numpy())
    with pytest.raises(ValueError, match="curvature rows required"):
        opened.write(0, rows[0])


def test_store_refuses_another_projection_or_configuration(tmp_path):
    folder = tmp_path / "grads"
    offsets = np.array([0, 2, 3])
    s = GradientStore(folder, offsets, 4, _meta(seed=0), rows_per_point=2)
    s.commit([])
    with pytest.raises(DveError, match="another projection") as err:
        GradientStore(folder, offsets, 4, _meta(seed=1), rows_per_point=2)
    msg = str(err.value)
    assert "\n" not in msg and "seed" in msg
    with pytest.raises(ArtifactError, match="another configuration"):
        GradientStore(folder, offsets, 4, _meta(curvature="mc"), rows_per_point=2)
    with pytest.raises(ArtifactError, match="another configuration"):
        GradientStore(folder, np.array([0, 1, 3]), 4, _meta(), rows_per_point=2)
