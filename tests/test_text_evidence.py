"""Finding extraction: negation, uncertainty, attributes, concept vectors."""

import numpy as np
import pytest

from medseek.text import lexicon as lx
from medseek.text.evidence import Evidence, concept_vector, extract_evidence


def found(text):
    """{finding: (negated, uncertain)} for the explicit mentions (first one wins)."""
    out = {}
    for ev in extract_evidence(text):
        out.setdefault(ev.finding, (ev.negated, ev.uncertain))
    return out


POS, NEG, UNC = (False, False), (True, False), (False, True)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("There is a small left pleural effusion.", {"pleural effusion": POS}),
        ("No pleural effusion.", {"pleural effusion": NEG}),
        ("No focal consolidation, pleural effusion, or pneumothorax.",
         {"consolidation": NEG, "pleural effusion": NEG, "pneumothorax": NEG}),
        ("Without evidence of pneumothorax.", {"pneumothorax": NEG}),
        ("Negative for cardiomegaly.", {"cardiomegaly": NEG}),
        ("The lungs are free of nodules.", {"nodule": NEG}),
        ("The previously seen effusion has resolved.", {"pleural effusion": NEG}),
        ("Resolved left basilar atelectasis.", {"atelectasis": NEG}),
        ("The heart is not enlarged.", {"cardiomegaly": NEG}),
        ("Atelectasis is no longer seen.", {"atelectasis": NEG}),
        # scope ends at "but" / "however" / the sentence end
        ("No effusion but mild bibasilar atelectasis.",
         {"pleural effusion": NEG, "atelectasis": POS}),
        ("No pneumothorax; however, there is a right lower lobe opacity.",
         {"pneumothorax": NEG, "opacity": POS}),
        ("No pneumothorax. Cardiomegaly.", {"pneumothorax": NEG, "cardiomegaly": POS}),
        # pseudo-negation: "no change" is not a negation of the finding
        ("No change in the calcified granuloma.", {"calcified granuloma": POS}),
        # uncertainty, before and after the finding
        ("Left basilar opacity may represent pneumonia.", {"opacity": POS, "pneumonia": UNC}),
        ("Possible small right effusion.", {"pleural effusion": UNC}),
        ("Cannot exclude pneumonia.", {"pneumonia": UNC}),
        ("A small effusion cannot be excluded.", {"pleural effusion": UNC}),
        ("Opacity, likely atelectasis.", {"opacity": POS, "atelectasis": UNC}),
        ("Findings suspicious for pneumonia.", {"pneumonia": UNC}),
        # negation wins over uncertainty
        ("No definite effusion.", {"pleural effusion": NEG}),
        ("Age-indeterminate compression deformity of T12.", {"deformity": POS}),
        ("The cardiac silhouette is enlarged.", {"enlarged cardiac silhouette": POS}),
        ("No visualized pneumothorax.", {"pneumothorax": NEG}),
        ("Question small right effusion.", {"pleural effusion": UNC}),
        ("Small effusion versus pleural thickening.",
         {"pleural effusion": UNC, "pleural thickening": UNC}),
        ("Small pericardial effusion.", {"pericardial effusion": POS}),
        ("Heart size is mildly enlarged.", {"cardiomegaly": POS}),
        ("Right upper lobe collapse.", {"atelectasis": POS}),
        ("Calcified granuloma and calcified hilar nodes.",
         {"calcified granuloma": POS, "calcinosis": POS}),
    ],
)
def test_negation_and_uncertainty(text, expected):
    assert found(text) == expected


def test_clear_lungs_negate_airspace_findings_only():
    evs = extract_evidence("The lungs are clear. Calcified granuloma in the right apex.")
    by = {ev.finding: ev for ev in evs}
    assert by["opacity"].negated and by["airspace disease"].negated and by["opacity"].implied
    assert by["calcified granuloma"].positive and not by["calcified granuloma"].implied
    assert concept_vector(evs, ["opacity", "calcified granuloma"]).tolist() == [0.0, 1.0]


def test_normal_heart_size_negates_cardiomegaly():
    (ev,) = [e for e in extract_evidence("Heart size is normal.") if e.finding == "cardiomegaly"]
    assert ev.negated
    # but not when hedged or denied
    assert not [e for e in extract_evidence("Heart size is not normal.") if e.negated]


@pytest.mark.parametrize(
    "text, finding, location, laterality, severity",
    [
        ("Mild bibasilar atelectasis.", "atelectasis", "base", "bilateral", "mild"),
        ("Large left pleural effusion.", "pleural effusion", "pleura", "left", "severe"),
        ("Opacity in the right middle lobe.", "opacity", "middle lobe", "right", None),
        ("Moderate cardiomegaly.", "cardiomegaly", None, None, "moderate"),
        ("Calcified right hilar lymph nodes.", "calcinosis", "hilum", "right", None),
        ("Scarring at both apices.", "cicatrix", "apex", "bilateral", None),
        ("Compression deformity at T11.", "deformity", "thoracic spine", None, None),
        ("Minimal streaky opacity at the left lung base.", "opacity", "base", "left", "minimal"),
    ],
)
def test_attributes(text, finding, location, laterality, severity):
    (ev,) = [e for e in extract_evidence(text) if e.finding == finding]
    assert (ev.location, ev.laterality, ev.severity) == (location, laterality, severity)
    assert ev.positive


def test_attributes_stay_in_their_list_item():
    evs = {e.finding: e for e in extract_evidence("Mild cardiomegaly, left effusion.")}
    assert evs["cardiomegaly"].laterality is None
    assert evs["pleural effusion"].severity is None


def test_span_and_sentence_point_into_the_text():
    text = "Heart normal.  Small RIGHT effusion, possibly loculated."
    (ev,) = [e for e in extract_evidence(text) if e.finding == "pleural effusion"]
    assert text[ev.span[0]:ev.span[1]] == "effusion"
    assert ev.sentence == "Small RIGHT effusion, possibly loculated."
    assert ev.laterality == "right" and ev.severity == "mild"


def test_subsumption_and_explanation():
    # "calcified granuloma" is one finding, not calcinosis + granuloma
    assert found("Calcified granuloma.") == {"calcified granuloma": POS}
    # calcification attributed to atherosclerosis is reported as atherosclerosis
    assert found("Atherosclerotic calcification of the aorta.") == {"atherosclerosis": POS}
    assert found("Calcified hilar nodes.") == {"calcinosis": POS}


def test_concept_vector():
    concepts = ["cardiomegaly", "pleural effusion", "pneumonia", "nodule"]
    evs = extract_evidence("Cardiomegaly. No effusion. Possible pneumonia.")
    assert concept_vector(evs, concepts).tolist() == [1, 0, 0, 0]
    assert concept_vector(evs, concepts, uncertain_weight=0.5).tolist() == [1, 0, 0.5, 0]
    assert concept_vector([], concepts).dtype == np.float32
    with pytest.raises(ValueError, match="duplicates"):
        concept_vector(evs, ["nodule", "nodule"])
    with pytest.raises(ValueError, match="uncertain_weight"):
        concept_vector(evs, concepts, uncertain_weight=2)


def test_lexicon_is_consistent():
    assert len(lx.TOP14) == 14 and len(set(lx.TOP14)) == 14
    names = {f.name for f in lx.FINDINGS}
    assert len(names) == len(lx.FINDINGS)
    for f in lx.FINDINGS:
        assert f.mesh and f.patterns
        assert set(f.subsumes) <= names and set(f.explains) <= names
    for _, denied in lx.IMPLIED_NEGATIONS:
        assert set(denied) <= names


def test_evidence_is_frozen_and_input_checked():
    ev = extract_evidence("Cardiomegaly.")[0]
    assert isinstance(ev, Evidence)
    with pytest.raises(AttributeError):
        ev.negated = True
    with pytest.raises(TypeError):
        extract_evidence(None)
    assert extract_evidence("") == []
