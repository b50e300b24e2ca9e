"""CheXficient-style curation: favours small clusters, deterministic by seed."""

from __future__ import annotations

import numpy as np
import pytest

from medseek.train.curation import curation_report, select_curated, select_random, water_fill


def clustered(sizes=(300, 60, 12), seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(len(sizes), 8) * 10.0
    x = np.concatenate([c + rng.normal(size=(n, 8)) for c, n in zip(centers, sizes)])
    truth = np.repeat(np.arange(len(sizes)), sizes)
    return x, truth


def test_water_fill_is_as_even_as_sizes_allow():
    q = water_fill(np.array([300, 60, 12]), 74)
    assert q.tolist() == [31, 31, 12] and q.sum() == 74
    assert water_fill(np.array([5, 5]), 10).tolist() == [5, 5]


def test_curated_favours_small_clusters_over_random():
    x, truth = clustered()
    cur, assign = select_curated(x, 0.2, seed=0, clusters=3)
    rnd = select_random(len(x), 0.2, seed=0)
    assert len(cur) == len(rnd) == round(0.2 * len(x))
    small = truth == 2
    assert small[cur].sum() == 12  # every member of the rarest cluster
    assert small[cur].sum() > 3 * small[rnd].sum()
    assert (truth[cur] == 0).sum() < (truth[rnd] == 0).sum()
    # the k-means clusters are the true ones (up to renaming)
    assert len({(a, t) for a, t in zip(assign, truth)}) == 3


def test_curation_is_deterministic_by_seed():
    x, _ = clustered()
    a, _ = select_curated(x, 0.2, seed=1, clusters=3)
    b, _ = select_curated(x, 0.2, seed=1, clusters=3)
    c, _ = select_curated(x, 0.2, seed=2, clusters=3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(select_random(50, 0.5, 3), select_random(50, 0.5, 3))


def test_loss_priority_prefers_high_loss_members():
    x, truth = clustered()
    losses = np.where(np.arange(len(x)) % 2 == 0, 5.0, 0.0)  # even rows are "hard"
    idx, _ = select_curated(x, 0.2, seed=0, losses=losses, clusters=3, loss_weight=10.0)
    big = idx[truth[idx] == 0]
    assert (big % 2 == 0).all()


def test_report_counts_rare_labels():
    labels = np.zeros((10, 3), dtype=bool)
    labels[:8, 0] = True
    labels[8:, 1] = True
    labels[9, 2] = True
    rep = curation_report(np.array([0, 8, 9]), labels, ["common", "rare", "rarest"], np.array([0] * 8 + [1] * 2))
    assert rep["rare_labels"][:2] == ["rarest", "rare"]
    assert rep["rare_kept_fraction"]["rare"] == 1.0 and rep["labels_chosen"]["common"] == 1
    assert rep["clusters_chosen"] == [1, 2]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="fraction"):
        select_random(10, 0.0, 0)
    with pytest.raises(ValueError, match="embeddings"):
        select_curated(np.zeros(5), 0.5, 0)
    with pytest.raises(ValueError, match="losses"):
        select_curated(np.zeros((5, 2)), 0.5, 0, losses=np.zeros(3))
