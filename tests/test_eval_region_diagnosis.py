"""kNN diagnosis, global vs WristMIR region rerank, on hand-built embeddings."""

import numpy as np
import pytest

from medseek.eval.region_diagnosis import f1_scores, knn_region_diagnosis


def unit(a):
    a = np.asarray(a, dtype=np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_f1_scores_by_hand():
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], bool)
    pred = np.array([[1, 0], [0, 1], [1, 0], [0, 0]], bool)
    # label 0: tp 1, fp 1, fn 1 -> 0.5; label 1: tp 1, fp 0, fn 1 -> 2/3
    macro, micro = f1_scores(pred, truth)
    assert macro == pytest.approx((0.5 + 2 / 3) / 2)
    assert micro == pytest.approx(2 * 2 / (2 * 2 + 1 + 2))


def test_region_rerank_fixes_what_the_global_vote_misses():
    """Globally every query looks like the unfractured archive images; region 0's
    embedding tells the fractured ones apart. The region vote must find the fractures
    the global vote misses, and say so in the paired difference."""
    rng = np.random.default_rng(0)
    n_arch, n_q, d = 40, 12, 8
    y_arch = np.zeros((n_arch, 1), bool)
    y_arch[:20] = True  # the first half of the archive is fractured
    y_q = np.zeros((n_q, 1), bool)
    y_q[:6] = True
    base = unit(rng.normal(size=d))
    # global: fractured archive images are far from every query, unfractured close
    arch = unit(np.where(y_arch, -1.0, 1.0) * base + 0.05 * rng.normal(size=(n_arch, d)))
    query = unit(base + 0.05 * rng.normal(size=(n_q, d)))
    frac, whole = unit(rng.normal(size=d)), unit(rng.normal(size=d))
    a_reg = unit(np.where(y_arch, frac, whole) + 0.05 * rng.normal(size=(n_arch, d)))[:, None]
    q_reg = unit(np.where(y_q, frac, whole) + 0.05 * rng.normal(size=(n_q, d)))[:, None]
    out = knn_region_diagnosis(query, q_reg, arch, a_reg, y_arch, y_q, np.arange(n_q),
                               ["distal radius fracture"], k=5, k_prime=40, alpha=1.0, n_boot=200)
    assert out["macro_f1_global"]["value"] == 0.0  # global top-5 are all unfractured
    assert out["macro_f1_region"]["value"] == pytest.approx(1.0)
    assert out["macro_f1_delta"]["lo"] > 0
    assert out["support"] == [6] and out["patients"] == n_q
    # alpha 0 keeps the global order: no difference at all
    same = knn_region_diagnosis(query, q_reg, arch, a_reg, y_arch, y_q, np.arange(n_q),
                                ["x"], k=5, k_prime=40, alpha=0.0, n_boot=50)
    assert same["macro_f1_region"]["value"] == same["macro_f1_global"]["value"]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="region embeddings must be"):
        knn_region_diagnosis(unit(np.ones((2, 4))), unit(np.ones((2, 2, 4))), unit(np.ones((3, 4))),
                             unit(np.ones((3, 1, 4))), np.zeros((3, 1), bool), np.zeros((2, 1), bool),
                             np.arange(2), ["a"])
