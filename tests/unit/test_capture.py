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


# --------------------------------------------------------------------- the training-step fast path
# (Projector.project_captured on what LinearFactorHooks saw) against the reference path
# (factors with the ones column and 1/w, then project_factors) and against one autograd call
# per sample projected through the materialised gradient (project_blocks).
FUSED_TOL = dict(rtol=0, atol=1e-13)  # float64: the paths differ by summation order only


def _weighted_step_rows(task: Task, proj: Projector, w: torch.Tensor, dtype=None):
    """(fused rows, reference rows) of one backward of Σ_i w_i ℓ_i."""
    from dve_repro.grads import LinearFactorHooks

    params = {k: v.detach().clone().requires_grad_(True) for k, v in task.model.named_parameters()}
    blocks = proj.blocks
    with LinearFactorHooks(task.model, blocks) as hooks:
        (task.per_sample_loss(params, task.x_train, task.y_train) * w).sum().backward()
    inputs, grads = dict(hooks._inputs), dict(hooks._grads)
    fused = proj.project_captured(hooks.captured(), 1.0 / w, dtype)
    assert hooks._inputs == {} and hooks._grads == {}
    hooks._inputs.update(inputs)
    hooks._grads.update(grads)
    reference = proj.project_factors(hooks.factors(w))
    return fused, reference


# (k_out, k_in): both factors projected with 1/w on the output side; the output factor kept
# exactly on the 4-class layer (4 ≤ 6) with 1/w on the input side; everything kept exactly
# (identity matrices, the bias's ones column appended).
@pytest.mark.parametrize("k_out,k_in", [(3, 5), (6, 2), (50, 50)])
def test_fused_training_rows_equal_reference_and_per_sample_autograd(task, k_out, k_in):
    blocks = gradient_layout(task.model)
    proj = Projector(ProjectionConfig(kind="kronecker", k_in=k_in, k_out=k_out, seed=3), blocks)
    w = torch.tensor([0.5, 0.25, 1 / 3, 1 / 6, 2.0, 0.1, 0.7], dtype=torch.float64)  # unequal weights
    fused, reference = _weighted_step_rows(task, proj, w)
    assert fused.shape == (7, proj.out_dim) and fused.dtype == torch.float64
    naive = proj.project_blocks(per_sample_grads_naive(task.per_sample_loss, params_of(task), task.x_train,
                                                       task.y_train, blocks))
    assert naive.abs().max() > 1e-3
    torch.testing.assert_close(fused, reference, **FUSED_TOL)
    torch.testing.assert_close(fused, naive, **FUSED_TOL)


def test_fused_float32_rows_from_float64_factors(task):
    """Float32 storage: the rows are projected in float32 and agree at float32 tolerance."""
    blocks = gradient_layout(task.model)
    proj = Projector(ProjectionConfig(kind="kronecker", k_in=5, k_out=3, seed=3), blocks)
    w = torch.full((7,), 1 / 7, dtype=torch.float64)
    fused32, reference = _weighted_step_rows(task, proj, w, torch.float32)
    assert fused32.dtype == torch.float32
    torch.testing.assert_close(fused32.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    assert (fused32.double() - reference).abs().max() > 0  # really computed in float32


def test_fused_path_refuses_a_materialising_projection(task):
    blocks = gradient_layout(task.model)
    proj = Projector(ProjectionConfig(kind="none"), blocks)
    with pytest.raises(ValueError, match="Kronecker"):
        proj.project_captured({}, torch.ones(1))


@pytest.mark.parametrize("storage", ["float64", "float32"])
def test_training_capture_through_the_store(task, tmp_path, storage):
    """A capturing training step writes, through the background writer, the rows of one
    autograd call per sample (float64: tight; float32 storage: float32 tolerance)."""
    from dve_repro.config import compose
    from dve_repro.optim import init_state
    from dve_repro.train import _TrainCapture

    blocks = gradient_layout(task.model)
    proj = Projector(ProjectionConfig(kind="kronecker", k_in=5, k_out=3, seed=3), blocks)
    n = task.x_train.shape[0]
    offsets = np.array([0, n, 2 * n])
    store = GradientStore(tmp_path / "grads", offsets, proj.out_dim, {"projection": proj.describe()}, 0, storage)
    cap = _TrainCapture(Featurizer(task, blocks, proj, "hooks"), store, "ef", 1, 0,
                        torch.float32 if storage == "float32" else None)
    cfg = compose(["experiment=tiny_mlp"])
    params = params_of(task)
    state = init_state(params, cfg.optim)
    w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    expected = []
    for t in range(2):
        expected.append(proj.project_blocks(per_sample_grads_naive(task.per_sample_loss, params, task.x_train,
                                                                   task.y_train, blocks)))
        params, state, _ = cap.step(task, params, state, t, task.x_train, task.y_train, w, 0.5, cfg)
    cap.store.commit([0, 1])
    cap.store.close()
    assert cap.store.waited_s >= 0 and cap.store.written_s > 0
    again = GradientStore.open_existing(tmp_path / "grads")
    assert again.complete and again.G.dtype == np.dtype(storage)
    got = torch.from_numpy(np.array(again.G)).double()
    want = torch.cat(expected)
    if storage == "float64":
        torch.testing.assert_close(got, want, **FUSED_TOL)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_store_writes_in_its_dtype_and_refuses_wrong_rows(tmp_path):
    offsets = np.array([0, 2, 5])
    s = GradientStore(tmp_path / "grads", offsets, 4, _meta(), rows_per_point=2, dtype="float32")
    rows = torch.randn(3, 4, dtype=torch.float64)
    curv = torch.randn(6, 4, dtype=torch.float64)
    s.write(1, rows, curv)
    assert s.G.dtype == np.float32 and s.F.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(s.G[2:5]), rows.float().numpy())  # the map sees the pwrite
    np.testing.assert_array_equal(np.asarray(s.F[4:10]), curv.float().numpy())
    assert not np.asarray(s.G[0:2]).any()
    with pytest.raises(ValueError, match="has 2 rows"):
        s.write(0, rows, curv)
    with pytest.raises(ValueError, match="do not fit"):
        s.write(0, torch.zeros(2, 5), torch.zeros(4, 5))
    s.write(0, rows[:2], curv[:4])
    s.commit([0, 1])
    del s
    done = GradientStore(tmp_path / "grads", offsets, 4, _meta(), rows_per_point=2, dtype="float32")
    with pytest.raises(ValueError, match="read-only"):
        done.write(0, rows[:2], curv[:4])
