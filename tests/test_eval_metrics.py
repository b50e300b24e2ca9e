"""Retrieval metrics of medseek.eval: hand-computed cases, ties, -inf, NaN, sklearn."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, ndcg_score

from medseek.eval import (
    average_precision,
    cosine_scores,
    crossmodal_recall,
    hits_at_k,
    label_overlap_relevance,
    mean_average_precision,
    mrr,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
)

NEG = -np.inf
# Query 0 ranks items [0, 2, 3, 1] (0.9 > 0.5 > 0.3 > 0.1).
# Query 1 ranks items [1, 2, 0] — 1 and 2 tie at 0.8, the lower index goes first —
# and item 3 (score -inf) is excluded: never retrieved, relevance 2 ignored.
SCORES = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.8, NEG]])
GRADED = np.array([[0.0, 2.0, 1.0, 0.0], [1.0, 0.0, 3.0, 2.0]])
L3 = math.log2(3)


def test_ndcg_by_hand():
    # q0: gains in rank order [0, 1, 0 | 2]; DCG@3 = 1/log2(3); ideal [2, 1, 0] -> 2 + 1/log2(3)
    # q1: gains in rank order [0, 3, 1]; DCG@3 = 3/log2(3) + 1/2; ideal (item 3 left out)
    #     [3, 1, 0] -> 3 + 1/log2(3)
    expected = [(1 / L3) / (2 + 1 / L3), (3 / L3 + 0.5) / (3 + 1 / L3)]
    np.testing.assert_allclose(ndcg_at_k(SCORES, GRADED, 3), expected, rtol=1e-12)
    # k = 1: q0 top item has gain 0; q1 top item (index 1, tie winner) has gain 0.
    np.testing.assert_allclose(ndcg_at_k(SCORES, GRADED, 1), [0.0, 0.0], atol=0)
    # k past the gallery size is the whole gallery (k = 4 here).
    np.testing.assert_array_equal(ndcg_at_k(SCORES, GRADED, 50), ndcg_at_k(SCORES, GRADED, 4))


def test_tie_break_and_exclusion_change_the_result():
    # Had the tie gone the other way (item 2 first), q1's nDCG@3 would be
    # (3 + 1/2) / (3 + 1/log2(3)); had item 3 been kept, the ideal would be 3 + 2/log2(3) + 1/2.
    got = ndcg_at_k(SCORES, GRADED, 3)[1]
    assert not math.isclose(got, 3.5 / (3 + 1 / L3))
    assert not math.isclose(got, (3 / L3 + 0.5) / (3 + 2 / L3 + 0.5))
    # Swapping the tied columns swaps which item wins: the rule is by index, not by value.
    swapped = SCORES[:, [0, 2, 1, 3]]
    np.testing.assert_allclose(ndcg_at_k(swapped, GRADED[:, [0, 2, 1, 3]], 3)[1], 3.5 / (3 + 1 / L3))


def test_average_precision_mrr_precision_by_hand():
    binary = GRADED > 0
    # q0 relevant flags in rank order [0, 1, 0, 1]: AP = (1/2)(1/2 + 2/4) = 1/2
    # q1 relevant flags in rank order [0, 1, 1] (item 3 excluded, R = 2): AP = (1/2)(1/2 + 2/3) = 7/12
    np.testing.assert_allclose(average_precision(SCORES, binary), [0.5, 7 / 12], rtol=1e-12)
    assert mean_average_precision(SCORES, binary) == pytest.approx((0.5 + 7 / 12) / 2, rel=1e-12)
    # First relevant item at rank 2 for both queries.
    np.testing.assert_allclose(reciprocal_rank(SCORES, binary), [0.5, 0.5])
    assert mrr(SCORES, binary) == pytest.approx(0.5)
    np.testing.assert_allclose(precision_at_k(SCORES, binary, 2), [0.5, 0.5])
    np.testing.assert_allclose(precision_at_k(SCORES, binary, 3), [1 / 3, 2 / 3])
    # k = 4 reaches q1's excluded item, which counts as not relevant.
    np.testing.assert_allclose(precision_at_k(SCORES, binary, 4), [0.5, 0.5])
    # Graded relevance is binarised (> 0) for these metrics.
    np.testing.assert_allclose(average_precision(SCORES, GRADED), [0.5, 7 / 12])


def test_recall_at_k_by_hand():
    # q0's match is item 1, ranked 4th; q1's match is item 2, ranked 2nd (loses the tie to item 1).
    positives = np.array([1, 2])
    assert recall_at_k(SCORES, positives, [1, 2, 3, 4]) == {1: 0.0, 2: 0.5, 3: 0.5, 4: 1.0}
    as_matrix = np.zeros((2, 4), dtype=bool)
    as_matrix[0, 1] = as_matrix[1, 2] = True
    assert recall_at_k(SCORES, as_matrix, [1, 2, 3, 4]) == {1: 0.0, 2: 0.5, 3: 0.5, 4: 1.0}
    # q1's only positive excluded: the query drops out of the mean (NaN row).
    hits = hits_at_k(SCORES, np.array([1, 3]), [4])
    assert hits[0, 0] == 1.0 and math.isnan(hits[1, 0])
    assert recall_at_k(SCORES, np.array([1, 3]), [1, 4]) == {1: 0.0, 4: 1.0}


def test_queries_without_relevant_items_are_nan():
    rel = np.array([[0, 0, 0, 0], [0, 1, 0, 0]], dtype=bool)
    # q1's single relevant item is ranked first: AP = RR = nDCG = 1, P@2 = 1/2.
    for per_query, q1 in ((average_precision(SCORES, rel), 1.0), (reciprocal_rank(SCORES, rel), 1.0),
                          (precision_at_k(SCORES, rel, 2), 0.5), (ndcg_at_k(SCORES, rel, 2), 1.0)):
        assert math.isnan(per_query[0]) and per_query[1] == q1
    # Only relevant item excluded by -inf -> NaN as well.
    only_excluded = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], dtype=bool)
    assert np.isnan(average_precision(SCORES, only_excluded)).all()
    assert math.isnan(mean_average_precision(SCORES, only_excluded))
    assert math.isnan(mrr(SCORES, only_excluded))


def test_crossmodal_recall_both_directions():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([[1.0, 0.1], [1.0, 0.9], [0.0, 1.0]])
    # cos(a_i, b_j): a0 best matches b0; a1 best b2; a2 best b1 -> a->b R@1 = 1/3 (only a0).
    # b0 best a0; b1 best a2; b2 best a1 -> b->a R@1 = 1/3 (only b0).
    out = crossmodal_recall(a, b, [1, 3])
    assert out == {"a_to_b": {1: pytest.approx(1 / 3), 3: 1.0}, "b_to_a": {1: pytest.approx(1 / 3), 3: 1.0}}
    np.testing.assert_allclose(np.diag(cosine_scores(a, a)), 1.0)


def test_label_overlap_relevance_any_and_jaccard():
    q = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)
    g = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(label_overlap_relevance(q, g, "any"), [[1, 1, 0, 0], [0, 0, 0, 0]])
    # |a∩b|/|a∪b|: {0,1} vs {0} = 1/2; vs {1,2} = 1/3; vs {2} = 0; vs {} = 0; empty vs empty = 0.
    np.testing.assert_allclose(label_overlap_relevance(q, g, "jaccard"), [[1 / 2, 1 / 3, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_matches_sklearn_without_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(12, 17))
    rel = rng.integers(0, 4, size=(12, 17)).astype(float)
    rel[3] = 0.0  # no relevant items: ours NaN, sklearn 0
    for k in (1, 5, 17):
        ours = ndcg_at_k(scores, rel, k)
        assert math.isnan(ours[3])
        for i in range(12):
            if i != 3:
                assert ours[i] == pytest.approx(ndcg_score(rel[i : i + 1], scores[i : i + 1], k=k), rel=1e-12)


def test_ndcg_ties_differ_from_sklearn_which_averages_tied_gains():
    rng = np.random.default_rng(5)
    scores = rng.integers(0, 3, size=(10, 9)).astype(float)  # many ties
    rel = rng.integers(0, 3, size=(10, 9)).astype(float)
    rel[:, 0] += 1.0  # every query has a relevant item
    ours = ndcg_at_k(scores, rel, 4)
    # Breaking ties by index explicitly (tiny decreasing offsets) reproduces our order,
    # so sklearn then agrees exactly...
    tie_broken = scores - 1e-6 * np.arange(9)
    for i in range(10):
        assert ours[i] == pytest.approx(ndcg_score(rel[i : i + 1], tie_broken[i : i + 1], k=4), rel=1e-12)
    # ...while sklearn's default on the tied scores averages gains over ties and differs.
    tied = np.array([ndcg_score(rel[i : i + 1], scores[i : i + 1], k=4) for i in range(10)])
    assert not np.allclose(ours, tied)


@pytest.mark.parametrize("seed", [0, 1])
def test_average_precision_matches_sklearn_without_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(8, 25))
    rel = rng.random((8, 25)) < 0.3
    rel[:, 0] = True
    scores[:, 5] = NEG  # excluded: sklearn sees the gallery without column 5
    ours = average_precision(scores, rel)
    keep = np.arange(25) != 5
    for i in range(8):
        assert ours[i] == pytest.approx(average_precision_score(rel[i, keep], scores[i, keep]), rel=1e-12)


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="relevance must have shape"):
        ndcg_at_k(SCORES, GRADED[:, :3], 2)
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        average_precision(np.array([[0.1, np.nan]]), np.array([[True, False]]))
    with pytest.raises(ValueError, match="scores must be 2-D"):
        mrr(np.zeros(4), np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match=r"k must be in \[1, 4\]"):
        precision_at_k(SCORES, GRADED, 5)
    with pytest.raises(TypeError, match="k must be an int"):
        ndcg_at_k(SCORES, GRADED, 2.0)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        ndcg_at_k(SCORES, GRADED, 0)
    with pytest.raises(ValueError, match="relevance must be >= 0"):
        ndcg_at_k(SCORES, -GRADED, 2)
    with pytest.raises(ValueError, match="positives indices"):
        recall_at_k(SCORES, np.array([0, 4]), [1])
    with pytest.raises(ValueError, match="ks must be in"):
        recall_at_k(SCORES, np.array([0, 1]), [0])
    with pytest.raises(ValueError, match="same number of labels"):
        label_overlap_relevance(np.ones((2, 3), bool), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="mode must be"):
        label_overlap_relevance(np.ones((2, 3), bool), np.ones((2, 3), bool), mode="dice")
    with pytest.raises(ValueError, match="a_emb and b_emb must be"):
        crossmodal_recall(np.ones((3, 2)), np.ones((4, 2)), [1])
    with pytest.raises(ValueError, match="b_emb has an all-zero row"):
        cosine_scores(np.ones((3, 2)), np.zeros((2, 2)))
