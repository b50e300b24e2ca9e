import numpy as np
import pytest

from medseek.text.concepts import NORMAL_AXIS, concept_names, hybrid_embedding, report_concepts


def test_report_concepts_sets_findings_and_normal_axis():
    names = concept_names()
    assert names[-1] == NORMAL_AXIS
    rows = report_concepts([
        "Small left pleural effusion. Heart size is enlarged, consistent with cardiomegaly.",
        "No pleural effusion or pneumothorax. The lungs are clear.",
    ])
    assert rows.shape == (2, len(names)) and rows.dtype == np.float32
    asserted = {names[i] for i in np.flatnonzero(rows[0])}
    assert asserted == {"pleural effusion", "cardiomegaly"}
    assert rows[0, -1] == 0.0
    # negated findings only: the report asserts nothing, so only the normal axis is set
    assert rows[1, :-1].sum() == 0.0 and rows[1, -1] == 1.0


@pytest.mark.parametrize("w", [0.0, 0.3, 0.5, 1.0])
def test_hybrid_inner_product_is_weighted_mean_of_cosines(w):
    rng = np.random.default_rng()
    t = rng.normal(size=(7, 12))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    c = (rng.random((7, 5)) < 0.4).astype(np.float32)
    c[c.sum(1) == 0, 0] = 1.0
    h = hybrid_embedding(t.astype(np.float32), c, text_weight=w)
    assert h.shape == (7, 17)
    np.testing.assert_allclose(np.linalg.norm(h, axis=1), 1.0, rtol=0, atol=1e-6)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    expected = w * (t @ t.T) + (1 - w) * (cn @ cn.T)
    np.testing.assert_allclose(h @ h.T, expected, rtol=0, atol=1e-5)


def test_hybrid_rejects_bad_inputs():
    t = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="all-zero rows"):
        hybrid_embedding(t, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="text_weight"):
        hybrid_embedding(t, np.ones((3, 2)), text_weight=1.5)
    with pytest.raises(ValueError, match="L2-normalised"):
        hybrid_embedding(2 * t, np.ones((3, 2)))
    with pytest.raises(ValueError, match="agree on N"):
        hybrid_embedding(t, np.ones((2, 2)))
    with pytest.raises(TypeError, match="single str"):
        report_concepts("Cardiomegaly.")


def test_mesh_headings_and_matrix_drop_no_indexing():
    from medseek.data.iu import IUReport, mesh_heading_matrix

    a = IUReport("CXR1", "", "", "", "", ("Opacity/lung/base/left", "Cardiomegaly/mild"))
    b = IUReport("CXR2", "", "", "", "", ("No Indexing",))
    c = IUReport("CXR3", "", "", "", "", ("normal",))
    assert a.mesh_headings == {"opacity", "cardiomegaly"} and b.mesh_headings == frozenset()
    names, m = mesh_heading_matrix([a, b, c])
    assert names == ["cardiomegaly", "normal", "opacity"]
    assert m.tolist() == [[True, False, True], [False, False, False], [False, True, False]]


# ---- laterality (issue 12): extra axes after the 47 of concept_names() ----

def _sides(text: str) -> dict[str, frozenset[str]]:
    from medseek.text.concepts import finding_sides
    from medseek.text.evidence import extract_evidence

    return finding_sides(extract_evidence(text))


@pytest.mark.parametrize("text, expected", [
    ("Small right pleural effusion.", {"pleural effusion": {"right"}}),
    ("No left effusion.", {}),
    ("Bilateral effusions.", {"pleural effusion": {"left", "right"}}),
    ("Small effusions bilaterally.", {"pleural effusion": {"left", "right"}}),
    # the nearest side word of "atelectasis" is "right": each side word goes to its own finding
    ("Left lower lobe atelectasis and right effusion.",
     {"atelectasis": {"left"}, "pleural effusion": {"right"}}),
    ("Effusion on the right and atelectasis on the left.",
     {"pleural effusion": {"right"}, "atelectasis": {"left"}}),
    ("There is a right lower lobe pneumonia and small left effusion.",
     {"pneumonia": {"right"}, "pleural effusion": {"left"}}),
    ("Right upper lobe opacity and atelectasis.", {"opacity": {"right"}, "atelectasis": {"right"}}),
    # negated or hedged on one side, asserted on the other
    ("No right pneumothorax. Left pleural effusion.", {"pleural effusion": {"left"}}),
    ("Right pleural effusion. No left effusion.", {"pleural effusion": {"right"}}),
    ("Possible right effusion.", {}),
    # a side in each of two sentences: both; no side stated: none
    ("Right pleural effusion. Small left effusion as well.",
     {"pleural effusion": {"left", "right"}}),
    ("Pleural effusion.", {"pleural effusion": set()}),
])
def test_finding_sides_from_hand_written_sentences(text, expected):
    assert _sides(text) == {k: frozenset(v) for k, v in expected.items()}


def test_lateral_concepts_extend_the_47_axes_without_changing_them():
    from medseek.text.concepts import lateral_concept_names, lateral_report_concepts

    base, names = concept_names(), lateral_concept_names()
    assert len(base) == 47 and names[:47] == base  # the finding head's axes stay put
    assert len(names) == 47 + 2 * 46 and len(set(names)) == len(names)
    texts = ["Small right pleural effusion.", "No left effusion. Heart size is normal.",
             "Bilateral effusions.", "Left lower lobe atelectasis and right effusion.",
             "Pleural effusion."]
    rows = lateral_report_concepts(texts)
    assert rows.shape == (5, len(names)) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[:, :47], report_concepts(texts))
    on = [{names[j] for j in np.flatnonzero(r[47:]) + 47} for r in rows]
    assert on == [{"right pleural effusion"}, set(),
                  {"left pleural effusion", "right pleural effusion"},
                  {"left atelectasis", "right pleural effusion"}, set()]
    assert rows[1, 46] == 1.0  # normal: nothing asserted


def test_lateral_concept_cosines_order_same_side_first():
    from medseek.text.concepts import lateral_report_concepts

    q, right, bilat, plain, left = lateral_report_concepts([
        "Right pleural effusion.", "Small right effusion.", "Bilateral pleural effusions.",
        "Pleural effusion.", "Left pleural effusion."])
    cos = [float(q @ c / np.linalg.norm(q) / np.linalg.norm(c))
           for c in (right, bilat, plain, left)]
    np.testing.assert_allclose(cos, [1.0, 2 / np.sqrt(6), 1 / np.sqrt(2), 0.5], rtol=0, atol=1e-6)
    # without the side axes all four would tie at 1: laterality is what orders them
    base = report_concepts(["Right pleural effusion.", "Left pleural effusion."])
    assert (base[0] == base[1]).all()


def test_laterality_agreement_counts_same_and_opposite_sides_by_hand():
    from medseek.text.evaluate import laterality_agreement

    R, L, B, U = (frozenset({"right"}), frozenset({"left"}), frozenset({"left", "right"}),
                  frozenset())
    eff = "pleural effusion"
    items = [{eff: R}, {eff: L}, {eff: B}, {eff: U}, {}, {eff: L, "atelectasis": R}]
    queries = [{eff: R}, {eff: B}, {"atelectasis": L}]
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                       [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.9]])
    same, opp = laterality_agreement(scores, queries, items, k=4)
    # query 0 (right effusion), top 4 = R, L, B, U: same R and B, opposite L, U neither
    assert same[0] == 0.5 and opp[0] == 0.25
    assert np.isnan(same[1]) and np.isnan(opp[1])  # bilateral: no one-sided finding
    # query 2 (left atelectasis), top 4 = item 5 (right atelectasis), 4, 3, 2
    assert same[2] == 0.0 and opp[2] == 0.25
    # ties are broken by item index, as ndcg_at_k does
    same, opp = laterality_agreement(np.zeros((1, 6)), queries[:1], items, k=2)
    assert (same[0], opp[0]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="scores must be"):
        laterality_agreement(scores[:2], queries, items)
