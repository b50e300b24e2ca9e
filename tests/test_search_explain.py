"""Concept explanations of hits (CEMRAG) and retrieval-based diagnosis."""

import numpy as np
import pytest

from medseek.search.diagnose import diagnose
from medseek.search.explain import ConceptBank, ConceptMatch, concept_scores, explain

NAMES = ["effusion", "cardiomegaly", "pneumothorax", "edema"]
QUERY = np.array([0.9, 0.5, -0.2, 0.1])
HITS = np.array([[0.8, 0.0, 0.9, 0.3],     # shares effusion (.72), edema (.03)
                 [0.1, 0.9, 0.0, -0.5],    # shares cardiomegaly (.45), effusion (.09)
                 [-0.1, -0.1, 0.5, -0.2]])  # pneumothorax only in the hit: nothing shared


def names(matches):
    return [m.concept for m in matches]


def test_top_changes_the_result():
    assert explain(QUERY, HITS, NAMES, top=1) != explain(QUERY, HITS, NAMES, top=3)


def test_shared_concepts_ranked_by_contribution():
    out = explain(QUERY, HITS, NAMES, top=3)
    assert [names(m) for m in out] == [["effusion", "edema"], ["cardiomegaly", "effusion"], []]
    first = out[0][0]
    assert first == ConceptMatch("effusion", 0.9, 0.8, pytest.approx(0.72, abs=1e-12))
    np.testing.assert_allclose([m.contribution for m in out[1]], [0.45, 0.09], atol=1e-12)
    assert [names(m) for m in explain(QUERY, HITS, NAMES, top=1)] == [
        ["effusion"], ["cardiomegaly"], []]
    assert [names(m) for m in explain(QUERY, HITS, NAMES, min_score=0.2)] == [
        ["effusion"], ["cardiomegaly"], []]


def test_multi_hot_report_concepts():
    # the evidence extractor's concept vectors are 0/1: shared = asserted by both reports
    q = np.array([1.0, 0.0, 1.0, 1.0])
    h = np.array([[1.0, 1.0, 0.0, 1.0]])
    assert names(explain(q, h, NAMES)[0]) == ["effusion", "edema"]  # ties: concept order


def test_embedding_scores_through_a_concept_bank():
    bank = ConceptBank(tuple(NAMES[:3]), np.eye(3, dtype=np.float32),
                       baseline=np.array([0.1, 0.1, 0.1]))
    emb = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    np.testing.assert_allclose(bank.scores(emb), [0.5, 0.7, -0.1], atol=1e-7)
    np.testing.assert_allclose(concept_scores(emb[None], np.eye(3)), [[0.6, 0.8, 0.0]], atol=1e-7)
    hit = np.array([[0.8, 0.6, 0.0]], dtype=np.float32)
    out = explain(bank.scores(emb), bank.scores(hit), bank.names)
    assert names(out[0]) == ["effusion", "cardiomegaly"]  # .5*.7=.35 vs .7*.5=.35: ties by order


def test_explain_errors():
    with pytest.raises(ValueError, match="must agree on the number of concepts"):
        explain(QUERY, HITS[:, :3], NAMES)
    with pytest.raises(ValueError, match="top must be >= 1"):
        explain(QUERY, HITS, NAMES, top=0)
    with pytest.raises(ValueError, match="names must be unique"):
        ConceptBank(("a", "a"), np.eye(2, dtype=np.float32))


LABELS = [("fracture",), ("fracture", "effusion"), (), ("effusion",)]
SCORES = np.array([0.9, 0.8, 0.7, 0.1])


def test_diagnose_k_changes_the_vote():
    assert diagnose(SCORES, LABELS, k=3) != diagnose(SCORES, LABELS, k=4)


def test_diagnose_votes_of_the_k_nearest():
    assert diagnose(SCORES, LABELS, k=3) == {"effusion": pytest.approx(1 / 3),
                                             "fracture": pytest.approx(2 / 3)}
    assert diagnose(SCORES, LABELS, k=4) == {"effusion": 0.5, "fracture": 0.5}
    w = np.exp(np.array([0.9, 0.8, 0.7]) / 0.1)
    w /= w.sum()
    got = diagnose(SCORES, LABELS, k=3, weighted=True)
    assert got["fracture"] == pytest.approx(w[0] + w[1], abs=1e-12)
    assert got["effusion"] == pytest.approx(w[1], abs=1e-12)


def test_diagnose_matrix_input_and_label_names():
    matrix = np.array([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=bool)
    assert diagnose(SCORES, matrix, k=3, label_names=["fracture", "effusion"]) == diagnose(
        SCORES, LABELS, k=3, label_names=["fracture", "effusion"])
    assert list(diagnose(SCORES, LABELS, k=3, label_names=["fracture", "effusion"])) == [
        "fracture", "effusion"]
    with pytest.raises(ValueError, match="label_names is required"):
        diagnose(SCORES, matrix, k=3)
    with pytest.raises(ValueError, match="neighbour_labels must have 4 rows"):
        diagnose(SCORES, LABELS[:3], k=3)
