"""The public API (``dve_repro.api``) against oracles, in float64 on a tiny MLP with SGD.

* the recorder's rows (hooks inside the user's own backward) equal per-sample gradients
  from ``torch.func.vmap(grad)``, flattened here and projected with the same projector;
* ``embed`` equals ``embedding.explicit_embeddings`` (explicit p̃×p̃ products) over those
  oracle rows with the test's own learning rates and batch sizes;
* ``features`` equals the oracle gradient at θ_T, and ``score`` equals direct dot products;
* every refusal raises ``ConfigError`` with its message.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import dve_repro
from dve_repro import artifacts, embedding
from dve_repro.capture import GradientStore
from dve_repro.config import ProjectionConfig
from dve_repro.errors import ArtifactError, ConfigError, DveError
from dve_repro.grads import gradient_layout
from dve_repro.projection import Projector
from dve_repro.trajectory import Trajectory, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-12  # float64 throughout: different summation orders only


class MLP(nn.Module):
    def __init__(self, d_in=5, hidden=4, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_data(n=10, d_in=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=gen, dtype=torch.float64), torch.randint(0, classes, (n,), generator=gen)


def make_model(seed=0, cls=MLP):
    torch.manual_seed(seed)
    return cls().double()


def oracle_rows(model, x, y, projector):
    """[B, p̃]: vmap(grad) of each sample's loss, in the layout [W | b] per layer, projected."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    flat = [torch.cat([g[f"{b.name}.weight"], g[f"{b.name}.bias"][..., None]], -1).flatten(1) for b in projector.blocks]
    return projector.project_flat(torch.cat(flat, 1))


def batches(n, size, epochs, seed=0):
    out = []
    for e in range(epochs):
        perm = np.random.default_rng([seed, e]).permutation(n)
        out += [perm[s : s + size] for s in range(0, n, size)]
    return out


def record_sgd(run_dir, projection, epochs=2, batch=4, lr=0.3):
    """Train with the user's own loop (SGD, a decaying schedule, a short last batch) and the
    oracle rows computed before each step; returns (model, rows, lrs, plan, projector)."""
    x, y = make_data()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.1 * t)
    rec = dve_repro.Recorder(run_dir, model, opt, n_train=len(x), projection=projection, seed=3,
                             storage_dtype="float64")
    projector = Projector(rec.projector.cfg, gradient_layout(model))
    rows, lrs, plan = [], [], batches(len(x), batch, epochs)
    for idx in plan:
        rows.append(oracle_rows(model, x[idx], y[idx], projector))  # at θ_t, outside the step
        lrs.append(opt.param_groups[0]["lr"])
        with rec.step(idx, targets=y[idx]):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
        sched.step()
    rec.close()
    return model, torch.cat(rows), np.array(lrs), plan, projector


@pytest.mark.parametrize("projection", [None, 3])
def test_rows_embedding_and_scores_equal_the_oracles(tmp_path, projection):
    run = tmp_path / "run"
    model, G, lrs, plan, projector = record_sgd(run, projection)
    sizes = np.array([len(b) for b in plan])
    assert sizes.tolist() == [4, 4, 2, 4, 4, 2]
    assert projector.out_dim == (4 * 6 + 3 * 5 if projection is None else 3 * 3 + 3 * 3)

    # trajectory: the very batches and learning rates of the loop, the same format as dve train's
    traj = Trajectory.load(run)
    assert [b.tolist() for b in traj.batches] == [b.tolist() for b in plan]
    np.testing.assert_array_equal(traj.lrs, lrs)
    assert traj.epochs.tolist() == [0, 0, 0, 1, 1, 1]  # inferred: epoch 1 repeats indices
    assert np.isfinite(traj.frame["loss"]).all()
    assert load_checkpoint(run, len(plan))[0]["fc1.weight"].equal(model.fc1.weight.detach())

    # rows: hooks in the user's backward = vmap(grad) per-sample gradients, same projection
    store = GradientStore.open_existing(run / "grads")
    rows = torch.from_numpy(np.array(store.G))
    assert rows.shape == G.shape
    assert (rows - G).abs().max() < TOL * max(1.0, float(G.abs().max()))

    # embedding: Algorithm 1 over the recording = the explicit product over the oracle rows
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    E_ref = embedding.explicit_embeddings(G, offsets, lrs / sizes)
    emb = dve_repro.embed(run)
    assert emb.estimator.startswith("first-order SGD estimate")
    assert float(E_ref.abs().max()) > 1e-3
    assert (emb.E - E_ref).abs().max() < TOL
    assert emb.occurrences["index"].tolist() == np.concatenate(plan).tolist()
    steps = [float(torch.linalg.eigvalsh(G[a:b].T @ G[a:b])[-1]) * lr / (b - a)
             for a, b, lr in zip(offsets[:-1], offsets[1:], lrs, strict=True)]
    assert emb.largest_step == pytest.approx(max(steps), rel=1e-10) and 0 < emb.largest_step < 2
    layered = dve_repro.embed(run, blocks="layer")
    E_lay = embedding.explicit_embeddings(G, offsets, lrs / sizes, blocks=projector.block_slices())
    assert (layered.E - E_lay).abs().max() < TOL

    # features at θ_T and scores = direct dot products
    xq, yq = make_data(n=3, seed=7)
    q_ref = oracle_rows(model, xq, yq, projector)
    q = dve_repro.features(run, make_model(seed=5), xq, yq)  # θ_T comes from the checkpoint
    assert (q - q_ref).abs().max() < TOL
    s = (E_ref @ q_ref.mean(0)).numpy()
    idx = np.concatenate(plan)
    total = np.zeros(10)
    np.add.at(total, idx, s)
    last = np.zeros(10)
    last[idx] = s  # occurrences in step order: the last assignment is the last occurrence
    table = dve_repro.score(emb, q)
    assert table.index.tolist() == list(range(10))
    assert np.abs(s).max() > 1e-6
    np.testing.assert_allclose(table["all_epoch"].to_numpy(), total, rtol=0, atol=TOL)
    np.testing.assert_allclose(table["single_epoch"].to_numpy(), last, rtol=0, atol=TOL)
    one = dve_repro.score(emb, q[0])  # a single query point
    np.testing.assert_allclose(one["all_epoch"].to_numpy(), np.bincount(idx, (E_ref @ q_ref[0]).numpy()),
                               rtol=0, atol=TOL)


def test_embed_warns_when_a_step_of_the_recursion_amplifies(tmp_path):
    record_sgd(tmp_path / "run", None, epochs=1, lr=40.0)
    with pytest.warns(UserWarning, match=r"w_t λ_max\(G_tᵀG_t\) = .* > 2"):
        assert dve_repro.embed(tmp_path / "run").largest_step > 2


def test_cli_refuses_a_recording_with_a_pointer_to_the_api(tmp_path):
    from dve_repro.replay import TrainedRun

    record_sgd(tmp_path / "run", 3, epochs=1)
    assert artifacts.verify(tmp_path / "run") == []
    with pytest.raises(ArtifactError, match=r"dve_repro\.Recorder.*dve_repro\.embed"):
        TrainedRun.load(tmp_path / "run")


# ----------------------------------------------------------------------------- refusals
class WithScale(MLP):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return super().forward(x) / self.temperature


class Shared(MLP):
    def __init__(self):
        super().__init__(d_in=5, hidden=5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc1(x)))))


def sgd_recorder(tmp_path, model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return dve_repro.Recorder(tmp_path / "run", model, opt, n_train=10, projection=None, **kw), opt


def test_refuses_parameters_outside_linear_layers_unless_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"^temperature are trained but outside the captured nn\.Linear"):
        sgd_recorder(tmp_path, make_model(cls=WithScale))
    with pytest.raises(ConfigError, match="temperature"):
        sgd_recorder(tmp_path, make_model(cls=WithScale), leave_out=["fc1"])
    rec, _ = sgd_recorder(tmp_path, make_model(cls=WithScale), leave_out=["temperature"])
    assert rec.left_out == ["temperature"] and [b.name for b in rec.blocks] == ["fc1", "fc2"]
    # a frozen parameter is not trained, so nothing is left out
    model = make_model(cls=WithScale)
    model.temperature.requires_grad_(False)
    rec, _ = sgd_recorder(tmp_path / "frozen", model)
    assert rec.left_out == []


def _one_step(rec, opt, model, idx, x, y, backwards=1, reduce="mean"):
    with rec.step(idx, targets=y):
        out = model(x)
        loss = F.cross_entropy(out, y, reduction=reduce)
        for k in range(backwards):
            loss.backward(retain_graph=k + 1 < backwards)
        opt.step()
        opt.zero_grad()


def test_refuses_weight_sharing(tmp_path):
    rec, opt = sgd_recorder(tmp_path, make_model(cls=Shared))
    x, y = make_data()
    with pytest.raises(ConfigError, match=r"layer 'fc1' was called 2 times in one recorded step \(weight sharing"):
        _one_step(rec, opt, rec.model, np.arange(4), x[:4], y[:4])
    with pytest.raises(DveError, match="stopped after an error"):  # the recording cannot go on
        rec.close()


def test_refuses_two_backwards_in_one_step(tmp_path):
    model = make_model()
    rec, opt = sgd_recorder(tmp_path, model)
    x, y = make_data()
    with pytest.raises(ConfigError, match=r"backward ran 2 times through layer 'fc2' in one recorded step"):
        _one_step(rec, opt, model, np.arange(4), x[:4], y[:4], backwards=2)


def test_refuses_a_batch_that_does_not_match_the_indices(tmp_path):
    model = make_model()
    rec, _ = sgd_recorder(tmp_path, model)
    x, y = make_data()
    with (pytest.raises(ConfigError, match=r"layer 'fc1' saw a batch of 4 samples but rec.step got 3 indices"),
          rec.step(np.arange(3))):
        model(x[:4])
    rec2, opt2 = sgd_recorder(tmp_path / "b", model)
    with pytest.raises(ConfigError, match="got 3 indices but 4 targets"):
        _one_step(rec2, opt2, model, np.arange(3), x[:4], y[:4])
    rec3, _ = sgd_recorder(tmp_path / "c", model)
    with pytest.raises(ConfigError, match=r"outside \[0, n_train=10\)"):
        rec3.step([3, 10]).__enter__()


def test_refuses_a_sum_loss_and_gradients_left_from_before(tmp_path):
    model = make_model()
    x, y = make_data()
    rec, opt = sgd_recorder(tmp_path, model)
    with pytest.raises(ConfigError, match=r"not the mean of loss_fn over the batch .* 4× the mean's"):
        _one_step(rec, opt, model, np.arange(4), x[:4], y[:4], reduce="sum")
    rec, opt = sgd_recorder(tmp_path / "b", model)
    F.cross_entropy(model(x[4:]), y[4:]).backward()  # a gradient left in .grad before the step
    with pytest.raises(ConfigError, match="held a gradient from before this step"):
        _one_step(rec, opt, model, np.arange(4), x[:4], y[:4])


def test_refuses_unsupported_optimizers(tmp_path):
    model = make_model()
    for opt, msg in [(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "SGD with momentum"),
                     (torch.optim.Adam(model.parameters()), "Adam is not supported")]:
        with pytest.raises(ConfigError, match=msg):
            dve_repro.Recorder(tmp_path / "run", model, opt, n_train=10)


def test_adamw_is_embedded_only_as_a_labelled_sgd_proxy(tmp_path):
    x, y = make_data()
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with dve_repro.Recorder(tmp_path / "run", model, opt, n_train=10, projection=2) as rec:
        for idx in batches(10, 5, 1):
            _one_step(rec, opt, model, idx, x[idx], y[idx])
    state = load_checkpoint(tmp_path / "run", 2)[1]
    assert state["m.fc1.weight"].equal(opt.state[model.fc1.weight]["exp_avg"])
    with pytest.raises(ConfigError, match=r"trained with AdamW.*sgd_proxy=True"):
        dve_repro.embed(tmp_path / "run")
    emb = dve_repro.embed(tmp_path / "run", sgd_proxy=True)
    assert emb.estimator.startswith("SGD proxy") and emb.E.shape == (10, 2 * 2 + 2 * 2)
    q = rec.features(x[:2], y[:2])
    assert q.shape == (2, 8) and dve_repro.score(emb, q).shape == (10, 2)
    with pytest.raises(DveError, match="do not match the embedding's p̃=8"):
        dve_repro.score(emb, q[:, :5])


def test_projection_config_is_accepted_as_is(tmp_path):
    rec, _ = sgd_recorder(tmp_path, make_model())
    assert rec.projector.cfg.kind == "none"
    cfg = ProjectionConfig(kind="dense", dim=7, seed=1)
    model = make_model()
    rec = dve_repro.Recorder(tmp_path / "d", model, torch.optim.SGD(model.parameters(), lr=0.1), n_train=10,
                             projection=cfg)
    assert rec.projector.out_dim == 7
