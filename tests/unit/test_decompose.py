"""The decomposition's matrix-free scores (decompose.py) against the two computations they
stand for, float64 on the 27-parameter classifier of ``oracle_runs``:

* no projection, one M: the unrolled influence of ``unroll.py`` with the same curvature
  (Jacobian-vector products instead of hook factors: an independent route);
* projected (random Gaussian or fitted K-FAC basis), one M or one per layer: the scores of the
  stored embedding of Algorithm 1 (``run_embedding``), including Monte-Carlo curvature rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from oracle_runs import classifier_task, overrides, train

from dve_repro.config import compose
from dve_repro.decompose import Setting, matrix_free_scores, parse_sizes, projectors_for
from dve_repro.embed_stage import run_embedding
from dve_repro.errors import DveError
from dve_repro.train import capture_blocks
from dve_repro.unroll import query_gradients, unrolled_scores

# Two float64 routes to the same recursion over 12 steps: rounding only (~1e-14 measured).
RTOL = 1e-9

TRAIN = ("optim.lr=0.8", "train.batch_size=8", "train.epochs=3", "embed.mc_samples=2", "embed.mc_seed=4")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("decompose")
    task = classifier_task(seed=3)
    run = train(root, task, *TRAIN)
    return root, task, run


def _rel_err(got, want) -> float:
    want = np.asarray(want)
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _scores(root, task, run, settings):
    cfg = compose(overrides(root, task, *TRAIN))
    blocks = capture_blocks(run.task)
    return matrix_free_scores(cfg, run, blocks, settings, projectors_for(cfg, run, blocks, settings))


@pytest.mark.parametrize("curvature", ["ef", "gn"])
def test_unprojected_full_m_is_the_unrolled_influence(setup, one_thread, curvature):
    root, task, run = setup
    s = Setting(curvature, "none", 0, 0, "full")
    got = _scores(root, task, run, [s])[s]
    q = query_gradients(run, run.final_params(), task.x_val, task.y_val)
    want = unrolled_scores(run, {k: v[:1] for k, v in q.items()}, curvature)[:, 0]
    assert _rel_err(got, want) < RTOL


@pytest.mark.parametrize("setting", [
    Setting("gn", "kronecker", 2, 3, "layer"),
    Setting("ef", "kronecker", 2, 3, "full"),
    Setting("mc", "kfac", 2, 3, "full"),
    Setting("gn", "kfac", 2, 3, "layer"),
    Setting("gn", "none", 0, 0, "layer"),
])
def test_matrix_free_scores_are_the_stored_embeddings(setup, one_thread, setting):
    root, task, run = setup
    proj = ["projection=none"] if setting.projection == "none" else [
        f"projection={setting.projection}", f"projection.k_out={setting.k_out}", f"projection.k_in={setting.k_in}"]
    out = run_embedding(compose(overrides(root, task, *TRAIN, *proj, f"embed.curvature={setting.curvature}",
                                          f"embed.blocks={setting.blocks}")), run)
    want = pd.read_parquet(out / "scores.parquet")["score"].to_numpy()
    got = _scores(root, task, run, [setting])[setting]
    assert _rel_err(got, want) < RTOL, setting


def test_parse_sizes():
    assert parse_sizes("32x128, 16X256") == [(32, 128), (16, 256)]
    for bad in ("", "32", "32x0", "axb"):
        with pytest.raises(DveError, match="K_OUTxK_IN"):
            parse_sizes(bad)


def test_scores_are_cached_by_what_they_depend_on(setup, one_thread, monkeypatch):
    """The replay runs once per (run, settings, projection seed, mc draws): a second call
    reads the stored scores (equal), other settings or another projection seed replay again."""
    from dve_repro import decompose

    root, task, run = setup
    calls = []
    original = decompose.matrix_free_scores
    monkeypatch.setattr(decompose, "matrix_free_scores", lambda *a: calls.append(1) or original(*a))
    blocks = capture_blocks(run.task)
    settings = [Setting("ef", "kronecker", 2, 3, "full"), Setting("gn", "none", 0, 0, "layer")]

    def scores(*extra, settings=settings):
        cfg = compose(overrides(root, task, *TRAIN, *extra))
        return decompose.cached_scores(cfg, run, blocks, settings, projectors_for(cfg, run, blocks, settings))

    first = scores()
    again = scores()
    assert len(calls) == 1
    for s in settings:
        np.testing.assert_array_equal(again[s], first[s])
    scores(settings=settings[:1])
    scores("projection.seed=5")
    assert len(calls) == 3
