"""AUROC/AUPRC, zero-shot scores, k-NN label vote and diagnosis metrics."""

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medseek.eval import (
    auprc,
    auroc,
    diagnosis_metrics,
    knn_label_vote,
    per_label_auroc_auprc,
    zero_shot_scores,
)


def test_auroc_auprc_by_hand():
    s = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1], dtype=bool)
    # Positive/negative pairs: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4.
    assert auroc(s, y) == pytest.approx(0.75)
    # Thresholds 0.8 (P=1, R=1/2), 0.4 (P=1/2, R=1/2), 0.35 (P=2/3, R=1): AP = 1/2*1 + 1/2*2/3.
    assert auprc(s, y) == pytest.approx(0.5 + 1 / 3)


def test_ties_count_half_and_form_one_threshold():
    s = np.array([0.5, 0.5, 0.2])
    y = np.array([True, False, False])
    # Tied pair counts 1/2, the other pair 1: (1/2 + 1) / 2.
    assert auroc(s, y) == pytest.approx(0.75)
    # One threshold at 0.5 holds both tied items: P = 1/2 at R = 1 -> AP = 1/2
    # (a stable-order ranking would put the positive first and give 1).
    assert auprc(s, y) == pytest.approx(0.5)
    assert auroc(np.ones(3), y) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(4))
def test_auroc_auprc_match_sklearn_on_tied_random_data(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    s = rng.integers(0, 6, size=n).astype(float)  # heavy ties
    y = rng.random(n) < 0.4
    y[:2] = [True, False]
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), rel=1e-12)
    assert auprc(s, y) == pytest.approx(average_precision_score(y, s), rel=1e-12)
    cont = rng.normal(size=n)
    assert auroc(cont, y) == pytest.approx(roc_auc_score(y, cont), rel=1e-12)
    assert auprc(cont, y) == pytest.approx(average_precision_score(y, cont), rel=1e-12)


def test_per_label_skips_single_class_labels():
    scores = np.array([[0.9, 0.1], [0.2, 0.3], [0.8, 0.7]])
    labels = np.array([[1, 0], [0, 0], [1, 0]], dtype=bool)
    out = per_label_auroc_auprc(scores, labels, ["fracture", "effusion"])
    assert list(out) == ["fracture", "effusion"]
    assert out["fracture"] == (1.0, 1.0)
    assert all(math.isnan(v) for v in out["effusion"])
    assert list(per_label_auroc_auprc(scores, labels)) == [0, 1]
    with pytest.raises(ValueError, match="labels must have shape"):
        per_label_auroc_auprc(scores, labels[:2])
    with pytest.raises(ValueError, match="label_names must have 2 entries"):
        per_label_auroc_auprc(scores, labels, ["a"])


def test_zero_shot_scores_by_hand():
    img = np.array([[1.0, 0.0], [0.0, 3.0]])  # normalised inside: [1,0], [0,1]
    pairs = np.array([[[2.0, 0.0], [0.0, 1.0]]])  # label 0: positive [1,0], negative [0,1]
    np.testing.assert_allclose(zero_shot_scores(img, pairs), [[1.0], [-1.0]])
    sig = 1 / (1 + math.exp(-1.0))
    np.testing.assert_allclose(zero_shot_scores(img, pairs, mode="softmax", logit_scale=1.0), [[sig], [1 - sig]])
    np.testing.assert_allclose(zero_shot_scores(img, pairs[:, 0]), [[1.0], [0.0]])  # positives only
    with pytest.raises(ValueError, match="prompt_emb must have shape"):
        zero_shot_scores(img, np.ones((1, 3, 2)))
    with pytest.raises(ValueError, match="prompt_emb dimension 3"):
        zero_shot_scores(img, np.ones((1, 2, 3)))
    with pytest.raises(ValueError, match="mode must be"):
        zero_shot_scores(img, pairs, mode="max")


GALLERY = np.array([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=bool)
VOTE_SCORES = np.array([[0.9, 0.8, 0.1, -np.inf], [-np.inf] * 4])


def test_knn_label_vote_by_hand():
    # q0 ranks items 0, 1, 2 (item 3 excluded); q1 has no candidates at all.
    top2 = knn_label_vote(VOTE_SCORES, GALLERY, 2)
    np.testing.assert_allclose(top2[0], [1.0, 0.5])
    assert np.isnan(top2[1]).all()
    np.testing.assert_allclose(knn_label_vote(VOTE_SCORES, GALLERY, 3)[0], [2 / 3, 2 / 3])
    np.testing.assert_allclose(knn_label_vote(VOTE_SCORES, GALLERY, 4)[0], [2 / 3, 2 / 3])  # excluded item ignored
    # Softmax weights at temperature 0.1: exp(9) : exp(8) -> e/(e+1) and 1/(e+1).
    w0 = math.e / (math.e + 1)
    np.testing.assert_allclose(knn_label_vote(VOTE_SCORES, GALLERY, 2, weighted=True)[0], [1.0, 1 - w0])
    # A tie at the k-th place goes to the lower index.
    tied = np.array([[0.5, 0.5, 0.5, 0.1]])
    np.testing.assert_allclose(knn_label_vote(tied, GALLERY, 1), [[1.0, 0.0]])
    with pytest.raises(ValueError, match="gallery_labels must have 4 rows"):
        knn_label_vote(VOTE_SCORES, GALLERY[:3], 2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        knn_label_vote(VOTE_SCORES, GALLERY, 2, weighted=True, temperature=0.0)


def test_diagnosis_metrics_by_hand():
    probs = np.array([[0.9, 0.2, 0.0], [0.6, 0.7, 0.1], [0.4, 0.1, 0.0], [0.1, 0.5, 0.2]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    out = diagnosis_metrics(probs, labels, threshold=0.5, label_names=["a", "b", "c"])
    a, b, c = out["per_label"]["a"], out["per_label"]["b"], out["per_label"]["c"]
    # a: predicted [1,1,0,0] vs truth [1,0,1,0] -> TP 1, FP 1, FN 1 -> F1 2/4.
    assert (a["f1"], a["precision"], a["recall"], a["support"]) == (0.5, 0.5, 0.5, 2)
    # a: positives 0.9, 0.4 vs negatives 0.6, 0.1 -> 3 of 4 pairs ordered right.
    assert a["auroc"] == pytest.approx(0.75)
    # b: 0.5 >= threshold counts as predicted -> [0,1,0,1] vs [0,1,0,0]: TP 1, FP 1 -> F1 2/3.
    assert b["f1"] == pytest.approx(2 / 3) and b["recall"] == 1.0 and b["auroc"] == 1.0
    # c: no positive and none predicted -> F1, precision, recall, AUROC undefined.
    assert all(math.isnan(c[key]) for key in ("f1", "precision", "recall", "auroc", "auprc"))
    assert out["macro"]["f1"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["macro"]["auroc"] == pytest.approx((0.75 + 1.0) / 2)
    with pytest.raises(ValueError, match="probs must not contain NaN"):
        diagnosis_metrics(np.full((4, 3), np.nan), labels)
    with pytest.raises(ValueError, match="labels must hold only 0/1"):
        diagnosis_metrics(probs, labels * 2.0 + 0.5)


def test_binary_inputs_rejected():
    with pytest.raises(ValueError, match="labels must have shape"):
        auroc(np.ones(3), np.ones(2, dtype=bool))
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        auprc(np.array([0.1, np.nan]), np.array([True, False]))
