"""Bootstrap intervals cover a known value at their nominal rate.

``compare.bootstrap_ci`` (Pearson / Spearman of estimate vs truth) on bivariate normal
samples with a known correlation, and ``detect.bootstrap`` (AUROC with stratified resampling)
on two normal classes with a known AUROC Φ(d/√2). A percentile bootstrap of n = 150 points is
slightly liberal; over R = 80 repetitions the coverage of a nominal 95% interval has a
binomial standard error of 2.4%, so the band [0.85, 0.99] leaves ~3.5 SE below 0.935 and
catches a resampling without replacement (coverage ≈ 0) or a misplaced percentile (≈ 0.7).
Measured: 0.94 (Pearson), 0.97 (AUROC).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from dve_repro.compare import _pearson, bootstrap_ci
from dve_repro.detect import auroc, bootstrap

R, N, BOOT = 80, 150, 150
COVERAGE_BAND = (0.85, 0.99)
RHO = 0.6


def pearson(a, b) -> float:
    """np.corrcoef (50× faster than scipy's pearsonr, which the intervals use in the pipeline;
    the resampling is what is tested here, and the two agree to 1e-12, checked below)."""
    return float(np.corrcoef(a, b)[0, 1])


def fast_auroc(values, flipped) -> float:
    """Mann-Whitney AUROC for continuous values (no ties), = detect.auroc (checked below)."""
    ranks = np.empty(len(values))
    ranks[np.argsort(-values)] = np.arange(1, len(values) + 1)
    n_pos = int(flipped.sum())
    return float((ranks[flipped].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(values) - n_pos)))


def test_correlation_interval_covers_the_true_correlation():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, RHO], [RHO, 1.0]])
    hits, widths = 0, []
    for r in range(R):
        xy = rng.multivariate_normal([0, 0], cov, size=N)
        if r == 0:
            assert abs(pearson(xy[:, 0], xy[:, 1]) - _pearson(xy[:, 0], xy[:, 1])) < 1e-12
        lo, hi = bootstrap_ci(xy[:, 0], xy[:, 1], pearson, BOOT, seed=r)
        hits += lo <= RHO <= hi
        widths.append(hi - lo)
    coverage = hits / R
    assert COVERAGE_BAND[0] <= coverage <= COVERAGE_BAND[1], (
        f"95% interval covers ρ in {coverage:.2f} of {R} samples"
    )
    # the width matches the normal-theory interval of Fisher's z (2·1.96·(1 − ρ²)/√n ≈ 0.2)
    assert 0.7 < np.mean(widths) / (2 * 1.96 * (1 - RHO**2) / np.sqrt(N)) < 1.3


def test_auroc_interval_covers_the_true_auroc():
    rng = np.random.default_rng(1)
    d = 1.0
    truth = float(
        norm.cdf(d / np.sqrt(2))
    )  # P(flipped value < clean value), flipped ~ N(0,1), clean ~ N(d,1)
    n_pos = 30
    flipped = np.zeros(N, bool)
    flipped[:n_pos] = True
    hits = 0
    for r in range(R):
        values = np.where(flipped, rng.normal(0, 1, N), rng.normal(d, 1, N))
        if r == 0:
            assert abs(fast_auroc(values, flipped) - auroc(values, flipped)) < 1e-12
        lo, hi = bootstrap(values, flipped, fast_auroc, BOOT, seed=r)
        hits += lo <= truth <= hi
    coverage = hits / R
    assert COVERAGE_BAND[0] <= coverage <= COVERAGE_BAND[1], (
        f"95% interval covers AUROC in {coverage:.2f} of {R} samples"
    )


def test_intervals_are_deterministic_and_nan_when_empty():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=40), rng.normal(size=40)
    assert bootstrap_ci(x, y, _pearson, 50, seed=3) == bootstrap_ci(x, y, _pearson, 50, seed=3)
    assert all(np.isnan(bootstrap_ci(x, y, _pearson, 0, seed=3)))
