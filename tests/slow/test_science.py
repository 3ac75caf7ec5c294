"""E1 science checks (paper §5.1, Fig. 3) on the default experiment ``mnist_mlp``: DVEmb
and the baselines against ground-truth TSLOO by retraining (float64, 200 points, SGD).

The whole pipeline (train → TSLOO → embed → unrolled scores and baselines) runs once per
module in a temporary folder; it takes a few minutes on CPU. Thresholds are set from the
measured values (given in comments) with a margin of about 0.05.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from dve_repro.config import compose

pytestmark = pytest.mark.slow

# DVEmb as E1 configures it (K-FAC eigenbasis projection, Gauss-Newton curvature, p̃ = 4,426)
# vs retrained TSLOO, mean validation loss, keep convention: measured 0.955 single-epoch and
# 0.927 all-epoch; the paper's estimator (random Kronecker projection, empirical Fisher,
# `dvemb-paper`) 0.792 and 0.705. Thresholds = measured - 0.05.
DVEMB_MIN = {"single": 0.90, "all": 0.87}
PAPER_SINGLE_MIN = 0.74
# Exact first-order unrolled influence (tanh MLP): measured 0.9998 single, 0.9995 all-epoch.
UNROLLED_HESSIAN_MIN = 0.99
# Influence function at θ_T: measured 0.487 single, 0.601 all-epoch (DVEmb wins by 0.30 and 0.10).
# The whole module took ~16 min on 2 CPUs before the fitted-basis GN embedding (basis fit,
# GN rows: about 6 min more on 2 idle cores).


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from dve_repro.compare import run_compare

    tmp = tmp_path_factory.mktemp("science")
    cfg = compose(["experiment=mnist_mlp", f"runtime.out_root={tmp / 'runs'}", "runtime.progress=false"])
    assert cfg.model.activation == "tanh", "the unrolled-Hessian check needs a smooth activation"
    out = run_compare(cfg, results_dir=tmp / "results")
    assert out is not None
    yield out
    # the run folders hold ~6 GB (Gauss-Newton factor rows of 12,000 occurrences): gone once
    # the module's tests have read the small results
    shutil.rmtree(tmp / "runs", ignore_errors=True)


@pytest.fixture(scope="module")
def summary(results) -> pd.DataFrame:
    s = pd.read_csv(results / "summary.csv")
    return s[s["convention"] == "keep"].set_index(["method", "setting"])


def rho(summary: pd.DataFrame, method: str, setting: str) -> float:
    return float(summary.loc[(method, setting), "spearman"])


@pytest.mark.parametrize("setting", ["single", "all"])
def test_dvemb_tracks_tsloo(summary, setting):
    r = rho(summary, "dvemb", setting)
    assert r > DVEMB_MIN[setting], (
        f"DVEmb's Spearman correlation with retrained {setting}-epoch TSLOO (mean validation loss, "
        f"keep convention) is {r:.3f}; expected > {DVEMB_MIN[setting]} — the stored embedding (fitted "
        "K-FAC projection, Gauss-Newton) no longer ranks training points by their true leave-one-out effect"
    )


def test_the_papers_estimator_tracks_single_epoch_tsloo(summary):
    r = rho(summary, "dvemb-paper", "single")
    assert r > PAPER_SINGLE_MIN, (
        f"the paper's estimator (random Kronecker projection, empirical Fisher) has Spearman {r:.3f} with "
        f"retrained single-epoch TSLOO; expected > {PAPER_SINGLE_MIN}"
    )


# Measured with the influence function's CG converged (damping 0.1): Spearman DVEmb 0.955 vs IF
# 0.702 (single), 0.927 vs 0.705 (all); Pearson 0.989 vs 0.216 and 0.966 vs 0.405 (the paper's
# estimator: 0.792 / 0.705 Spearman, 0.969 / 0.919 Pearson).
def test_dvemb_beats_influence_function_single_epoch(summary):
    d, i = rho(summary, "dvemb", "single"), rho(summary, "influence", "single")
    assert d > i, (
        f"single-epoch removal: DVEmb Spearman {d:.3f} does not beat the influence function's {i:.3f} "
        "(the trajectory-specific estimate should track TSLOO better than the trajectory-agnostic one)"
    )


@pytest.mark.parametrize("setting", ["single", "all"])
def test_dvemb_beats_influence_function_in_value(summary, setting):
    d = float(summary.loc[("dvemb", setting), "pearson"])
    i = float(summary.loc[("influence", setting), "pearson"])
    assert d > i, (
        f"{setting}-epoch removal: DVEmb Pearson {d:.3f} does not beat the influence function's {i:.3f} "
        "(DVEmb should predict the size of the leave-one-out effect, not only its rank)"
    )


def test_gauss_newton_dvemb_beats_influence_all_epoch(summary):
    d, i = rho(summary, "unrolled-gn", "all"), rho(summary, "influence", "all")
    assert d > i, f"all-epoch removal: Gauss-Newton DVEmb Spearman {d:.3f} does not beat influence {i:.3f}"


@pytest.mark.parametrize("setting", ["single", "all"])
def test_unrolled_hessian_is_nearly_exact(summary, setting):
    r = rho(summary, "unrolled-hessian", setting)
    assert r >= UNROLLED_HESSIAN_MIN, (
        f"{setting}-epoch removal: exact first-order unrolled influence (tanh MLP, no projection) has "
        f"Spearman {r:.4f} with retrained TSLOO; expected >= {UNROLLED_HESSIAN_MIN} — removing one point "
        "is a tiny perturbation, so first order should be near exact"
    )


# Magnitude, not only rank: the median over points of estimate ÷ retrained TSLOO (keep
# convention, mean validation loss) must be near 1, so the estimates have the size of the real
# effect. The median, not a least-squares slope: on E1 (lr 0.1) a few high-influence points
# respond less than linearly, and they alone pull the slope through 0 to 1.51 / 1.32 (exact
# unrolling, single / all-epoch) and 1.82 / 1.45 (DVEmb), while the typical point's ratio is
# 0.996 / 0.980 (exact unrolling), 1.02 / 0.73 (DVEmb: fitted projection, Gauss-Newton) and
# 1.31 / 1.14 (the paper's estimator: random projection, empirical Fisher).
# A wrong step weight (1/|B| = 1/64) or sign puts the ratio far outside these bands.
RATIO_BANDS = {"unrolled-hessian": 0.05, "dvemb": 0.45, "dvemb-paper": 0.45}


@pytest.mark.parametrize("setting", ["single", "all"])
@pytest.mark.parametrize("method", list(RATIO_BANDS))
def test_estimate_has_the_size_of_retrained_tsloo(results, method, setting):
    tidy = pd.read_csv(results / "tidy.csv")
    d = tidy[(tidy["method"] == method) & (tidy["setting"] == setting) & (tidy["convention"] == "keep")]
    t, e = d["truth"].to_numpy(), d["estimate"].to_numpy()
    ratio = float(np.median(e / t))
    band = RATIO_BANDS[method]
    assert abs(ratio - 1) <= band, (
        f"{method}, {setting}-epoch removal: median estimate ÷ retrained TSLOO is {ratio:.3f}, "
        f"outside 1 ± {band} — the estimate ranks points but no longer predicts the size of their effect"
    )
