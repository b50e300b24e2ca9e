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
