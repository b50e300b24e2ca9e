"""Modality gap and bootstrap intervals."""

import math

import numpy as np
import pytest

from medseek.eval import ModalityGap, auroc, bootstrap_ci, modality_gap


def test_gap_by_hand():
    a = np.array([[2.0, 0.0]] * 4)  # normalised to [1, 0]
    b = np.array([[0.0, 1.0]] * 4)
    gap = modality_gap(a, b, folds=2)
    assert isinstance(gap, ModalityGap)
    assert gap.centroid_distance == pytest.approx(math.sqrt(2))
    assert gap.mean_pair_cosine == pytest.approx(0.0)
    assert gap.mean_cross_cosine == pytest.approx(0.0)
    assert gap.separability == 1.0
    assert (gap.n_a, gap.n_b) == (4, 4)
    assert set(gap.to_dict()) >= {"centroid_distance", "separability", "mean_pair_cosine"}


def test_gap_small_for_identical_distributions_large_for_shifted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 8))
    same = rng.normal(size=(300, 8))
    shifted = rng.normal(size=(300, 8)) + 6.0 * np.eye(8)[0]  # most of the norm along one axis
    g_same = modality_gap(a, same, paired=False, seed=1)
    g_shift = modality_gap(a, shifted, paired=False, seed=1)
    assert g_same.centroid_distance < 0.15
    assert g_shift.centroid_distance > 0.7
    assert 0.35 < g_same.separability < 0.65
    assert g_shift.separability > 0.95
    assert math.isnan(g_same.mean_pair_cosine)
    # True pairs of a set with itself are perfectly aligned.
    assert modality_gap(a, a).mean_pair_cosine == pytest.approx(1.0)


def test_gap_rejects_bad_inputs():
    with pytest.raises(ValueError, match="paired=True needs the same number of rows"):
        modality_gap(np.ones((6, 2)), np.ones((5, 2)))
    with pytest.raises(ValueError, match="same dimension"):
        modality_gap(np.ones((6, 2)), np.ones((6, 3)))
    with pytest.raises(ValueError, match="a_emb must not contain NaN"):
        modality_gap(np.full((6, 2), np.nan), np.ones((6, 2)))
    with pytest.raises(ValueError, match="folds must be"):
        modality_gap(np.ones((3, 2)), np.ones((3, 2)), folds=5)


def test_bootstrap_contains_mean_ignores_nan_and_is_deterministic():
    rng = np.random.default_rng(3)
    values = rng.random(50)
    values[::7] = np.nan
    est, lo, hi = bootstrap_ci(values, n_boot=500, seed=11)
    assert est == pytest.approx(np.nanmean(values))
    assert lo < est < hi
    assert bootstrap_ci(values, n_boot=500, seed=11) == (est, lo, hi)
    assert bootstrap_ci(values, n_boot=500, seed=12) != (est, lo, hi)
    # A wider confidence level gives a wider interval.
    _, lo90, hi90 = bootstrap_ci(values, n_boot=500, alpha=0.1, seed=11)
    assert lo <= lo90 and hi90 <= hi
    assert bootstrap_ci(np.full(5, 0.25), n_boot=50) == (0.25, 0.25, 0.25)
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([np.nan, np.nan])))


def test_bootstrap_width_matches_normal_theory():
    # Mean of m unit-variance values: 95% interval ≈ ±1.96/sqrt(m) = ±0.098 at m = 400.
    values = np.random.default_rng(0).normal(size=400)
    est, lo, hi = bootstrap_ci(values, n_boot=2000, seed=0)
    assert (hi - lo) / 2 == pytest.approx(1.96 * values.std() / 20, rel=0.15)


def test_bootstrap_callable_statistic():
    rng = np.random.default_rng(1)
    y = rng.random(40) < 0.5
    s = y + rng.normal(scale=1.0, size=40)
    est, lo, hi = bootstrap_ci(lambda idx: auroc(s[idx], y[idx]), n_boot=200, seed=0, n=40)
    assert est == pytest.approx(auroc(s, y))
    assert lo < est < hi <= 1.0
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        bootstrap_ci(lambda idx: 0.0)
    with pytest.raises(ValueError, match="n is only used with a callable"):
        bootstrap_ci(np.ones(3), n=3)
    with pytest.raises(ValueError, match="values must be 1-D"):
        bootstrap_ci(np.ones((3, 2)))
    with pytest.raises(ValueError, match="alpha must be in"):
        bootstrap_ci(np.ones(3), alpha=1.5)
    with pytest.raises(ValueError, match="n_boot must be a positive int"):
        bootstrap_ci(np.ones(3), n_boot=0)
