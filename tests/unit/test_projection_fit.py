"""The fitted (K-FAC eigenbasis) projection, ``projection.kind=kfac`` (projection_fit.py).

Oracles, float64 on the 27-parameter classifier of ``oracle_runs``:

* with every direction kept (k_in, k_out ≥ the layers' sizes) the projection is an orthogonal
  rotation of each layer's gradient block, so the embedding's scores equal those without
  projection — for both curvatures, one M or one per layer, and with random directions mixed in;
* the stored eigenvectors and eigenvalues are numpy's ``eigh`` of the factor second moments
  (kfac), covariances (pca) or gradient-weighted moments (gradcov) computed here from the
  analytic per-sample factors of the MLP at the from-scratch iterates.

And the contract around it: a query projected with another basis is refused by ``dve score``,
capture during training with a fitted projection is refused with one line, and the older
projections keep their fingerprints.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from oracle_runs import Flat, classifier_task, overrides, sgd_iterates, train
from typer.testing import CliRunner

from dve_repro import artifacts
from dve_repro.cli import app
from dve_repro.config import compose, section, stage_payload
from dve_repro.embed_stage import run_embedding
from dve_repro.errors import ConfigError, DveError
from dve_repro.projection import FittedBasis, Projector
from dve_repro.projection_fit import BASIS, basis_dir, top_directions
from dve_repro.train import capture_blocks

# Rotated vs unrotated Algorithm 1 in float64 on O(1) numbers: rounding only (~1e-15 measured).
ROTATION_RTOL = 1e-10
# Moments from the hooks vs from the analytic factors: two summation orders, ~1e-16 relative.
EIG_RTOL = 1e-10

TRAIN = ("optim.lr=0.8", "train.batch_size=8", "train.epochs=3")
ALL_KEPT = ("projection=kfac", "projection.k_in=8", "projection.k_out=8")  # layers: [3, 5], [3, 4]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kfac")
    task = classifier_task(seed=3)
    run = train(root, task, *TRAIN)
    return root, task, run


def embed(root, task, run, *extra):
    return run_embedding(compose(overrides(root, task, *TRAIN, *extra)), run)


def _rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.mark.parametrize(
    "extra",
    [
        ("embed.curvature=ef", "embed.blocks=full"),
        ("embed.curvature=gn", "embed.blocks=full"),
        ("embed.curvature=gn", "embed.blocks=layer"),
        ("embed.curvature=gn", "embed.blocks=layer", "projection.random_fraction=0.5"),
        ("embed.curvature=ef", "embed.blocks=full", "projection.kind=pca"),
        ("embed.curvature=gn", "embed.blocks=full", "projection.kind=gradcov"),
    ],
)
def test_all_directions_kept_gives_the_unprojected_scores(setup, one_thread, extra):
    root, task, run = setup
    ref = embed(root, task, run, "projection=none", *[e for e in extra if e.startswith("embed.")])
    out = embed(root, task, run, *ALL_KEPT, *extra)
    E_ref, E = np.load(ref / "E.npy"), np.load(out / "E.npy")
    assert E.shape == E_ref.shape
    # a rotation, not the identity: coordinates differ, lengths do not
    assert _rel_err(E, E_ref) > 1e-2
    assert _rel_err(np.linalg.norm(E, axis=1), np.linalg.norm(E_ref, axis=1)) < ROTATION_RTOL
    for name in ("scores.parquet", "values.parquet"):
        got, want = pd.read_parquet(out / name), pd.read_parquet(ref / name)
        for col in ("score",) if name == "scores.parquet" else ("all_epoch", "single_epoch"):
            err = _rel_err(got[col], want[col])
            assert err < ROTATION_RTOL, f"{name}:{col} {extra}: relative error {err:.2e}"
    err = _rel_err(np.load(out / "scores_points.npy"), np.load(ref / "scores_points.npy"))
    assert err < ROTATION_RTOL, f"per-point scores {extra}: {err:.2e}"


def _analytic_factors(flat: Flat, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
    """The 4-3-3 tanh MLP's per-sample factors by hand: {layer: (a [B, d_in + 1], b [B, d_out])}
    with b = ∂ℓ/∂(layer output) of the unweighted cross-entropy."""
    p = flat.dict(v)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    z1 = x @ p["net.0.weight"].T + p["net.0.bias"]
    h = torch.tanh(z1)
    z2 = h @ p["net.2.weight"].T + p["net.2.bias"]
    b2 = torch.softmax(z2, dim=1) - torch.nn.functional.one_hot(y, z2.shape[1]).double()
    b1 = (b2 @ p["net.2.weight"]) * (1 - h**2)
    return {"net.0": (torch.cat([x, ones], 1), b1), "net.2": (torch.cat([h, ones], 1), b2)}


@pytest.mark.parametrize("kind", ["kfac", "pca", "gradcov"])
def test_fitted_eigenvectors_are_numpy_eigh_of_the_factor_moments(setup, one_thread, kind):
    root, task, run = setup
    fit_steps = 5
    extra = (*ALL_KEPT, f"projection.kind={kind}", f"projection.fit_steps={fit_steps}")
    embed(root, task, run, *extra)
    cfg = compose(overrides(root, task, *TRAIN, *extra))
    blocks = capture_blocks(run.task)
    tensors = artifacts.load_tensors(basis_dir(cfg, blocks) / BASIS)
    thetas = sgd_iterates(run)
    flat = Flat(task, run.final_params())
    rows: dict = {}
    for t in range(fit_steps):
        for name, (a, b) in _analytic_factors(flat, thetas[t], *task.batch(run.traj.batches[t])).items():
            rows.setdefault(name, []).append((a.numpy(), b.numpy()))
    for name, parts in rows.items():
        a, b = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if kind == "pca":  # centred: the covariance, as np.cov computes it (population normalisation)
            moments = (("in", np.cov(a.T, bias=True)), ("out", np.cov(b.T, bias=True)))
        elif kind == "gradcov":  # g = b ⊗ a: E[GᵀG] = E[‖b‖² a aᵀ], E[GGᵀ] = E[‖a‖² b bᵀ]
            wa, wb = (b**2).sum(1), (a**2).sum(1)
            moments = (("in", (a * wa[:, None]).T @ a / len(a)), ("out", (b * wb[:, None]).T @ b / len(b)))
        else:
            moments = (("in", a.T @ a / len(a)), ("out", b.T @ b / len(b)))
        for side, moment in moments:
            drop = kind == "pca" and side == "in"  # the bias column is constant: one zero eigenvalue
            vals, vecs = np.linalg.eigh(moment)
            vals, vecs = vals[::-1], vecs[:, ::-1].T
            got_vals = tensors[f"{name}.{side}_eigenvalues"].numpy()
            assert np.abs(got_vals - vals).max() < EIG_RTOL * vals[0], (name, side, got_vals, vals)
            P = tensors[f"{name}.{side}"].numpy()
            assert P.shape == vecs.shape
            if drop:  # the null direction's eigenvector is the bias axis, up to rounding: compare the rest
                P, vecs, vals = P[:-1], vecs[:-1], vals[:-1]
            gaps = np.diff(vals[::-1])[::-1]
            assert (np.abs(gaps) > 1e-6 * vals[0]).all(), "degenerate eigenvalues: eigenvectors not unique"
            signs = np.sign(np.sum(P * vecs, axis=1))
            assert _rel_err(P, vecs * signs[:, None]) < 1e-8, (name, side)
            # the documented sign: each row's largest-magnitude entry is positive
            assert (P[np.arange(len(P)), np.abs(P).argmax(1)] > 0).all()


def test_top_directions_mixes_orthonormal_random_rows():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(50, 12, generator=gen, dtype=torch.float64)
    M = X.T @ X / 50
    P, vals = top_directions(M, 6, 2, seed=9)
    assert P.shape == (6, 12) and vals.shape == (12,)
    torch.testing.assert_close(P @ P.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-12)
    top, _ = top_directions(M, 4, 0, seed=9)
    torch.testing.assert_close(P[:4], top, rtol=0, atol=0)  # the first rows are the eigenvectors
    torch.testing.assert_close(top @ M @ top.T, torch.diag(vals[:4]), rtol=0, atol=1e-12)
    other, _ = top_directions(M, 6, 2, seed=10)
    assert (other[4:] - P[4:]).abs().max() > 0.1  # the random rows come from the seed
    diag, dvals = top_directions(torch.tensor([1.0, 5.0, 3.0, 5.0], dtype=torch.float64), 3, 1, seed=1)
    assert dvals.tolist() == [5.0, 5.0, 3.0, 1.0]
    assert diag[0].tolist() == [0, 1, 0, 0] and diag[1].tolist() == [0, 0, 0, 1]  # ties by index
    torch.testing.assert_close(diag @ diag.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_projector_needs_a_fitting_basis(tiny):
    cfg = compose(tiny("projection=kfac", "projection.k_in=4", "projection.k_out=2"))
    from dve_repro.tasks import build_task

    blocks = capture_blocks(build_task(cfg))
    with pytest.raises(DveError, match="fitted from a finished training run"):
        Projector(cfg.projection, blocks)
    wrong = FittedBasis({b.name: (torch.eye(2, b.shape[0]), torch.eye(3, b.shape[1])) for b in blocks}, "x")
    with pytest.raises(DveError, match="has shapes"):
        Projector(cfg.projection, blocks, wrong)


def test_capture_during_training_with_a_fitted_projection_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"trajectory\.capture=false"):
        compose(tiny("projection=kfac", "trajectory.capture=true"))
    res = CliRunner().invoke(app, ["train", *tiny("projection=kfac", "trajectory.capture=true")])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: projection.kind=kfac"), res.stderr


def test_older_projections_keep_their_fingerprints(tiny):
    cfg = compose(tiny())
    assert "fit_steps" not in section(cfg, "projection") and "random_fraction" not in section(cfg, "projection")
    fitted = compose(tiny("projection=kfac", "projection.fit_steps=3"))
    assert section(fitted, "projection")["fit_steps"] == 3
    assert stage_payload(fitted, "embed") != stage_payload(compose(tiny("projection=kfac")), "embed")


def test_score_refuses_a_query_projected_with_another_basis(tiny, one_thread):
    run = CliRunner().invoke(app, ["train", *tiny()])
    assert run.exit_code == 0, run.output
    kfac = ("projection=kfac", "projection.k_in=16", "projection.k_out=4", "projection.fit_steps=4")
    res = CliRunner().invoke(app, ["embed", *tiny(*kfac)])
    assert res.exit_code == 0, res.output
    emb = Path(res.stdout.strip().splitlines()[-1])
    basis = artifacts.read_json(emb / "embedding.json")["projection"]["basis_blake2b"]
    assert len(basis) == 32
    ok = CliRunner().invoke(app, ["score", str(emb), "--split", "val"])
    assert ok.exit_code == 0, ok.output
    scores = pd.read_parquet(Path(ok.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(scores["score"], pd.read_parquet(emb / "scores.parquet")["score"], rtol=1e-12)
    # another fitted projection asked for by override
    res = CliRunner().invoke(app, ["score", str(emb), "projection.fit_steps=8"])
    assert res.exit_code == 2 and "another projection" in res.stderr, res.output
    # the stored basis replaced by another valid one (as a refit elsewhere could): refused by checksum
    cfg = compose(tiny(*kfac))
    from dve_repro.tasks import build_task

    folder = basis_dir(cfg, capture_blocks(build_task(cfg)))
    tensors = artifacts.load_tensors(folder / BASIS)
    tensors["net.0.in"] = tensors["net.0.in"].flip(0).contiguous()  # same span, other order
    artifacts.save_tensors(folder / BASIS, tensors)
    artifacts.write_json(folder / artifacts.MANIFEST, artifacts.build_manifest(folder))
    artifacts.write_json(folder / artifacts.DONE,
                         {"manifest_blake2b": artifacts.hash_file(folder / artifacts.MANIFEST)})
    assert not artifacts.verify(folder)
    res = CliRunner().invoke(app, ["score", str(emb), "--split", "val"])
    assert res.exit_code == 2, res.output
    assert "another projection" in res.stderr and "basis_blake2b" in res.stderr, res.stderr
