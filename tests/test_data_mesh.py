"""MeSH major-term parsing into normalised findings (terms are MeSH vocabulary, not report text)."""

from __future__ import annotations

import pytest

from medseek.data.mesh import DEFAULT_SEVERITY, normalised_labels, parse_mesh_term


def test_location_side_and_severity():
    f = parse_mesh_term("Opacity/lung/base/left/mild")
    assert (f.name, f.side, f.zone, f.severity) == ("opacity", "left", "base", 0.35)
    assert parse_mesh_term("Cardiomegaly").severity == DEFAULT_SEVERITY
    assert parse_mesh_term("Cardiomegaly/severe").severity > parse_mesh_term("Cardiomegaly/borderline").severity


@pytest.mark.parametrize("term, name", [
    ("Cardiac Shadow/enlarged", "cardiomegaly"),
    ("Lung/hyperdistention/mild", "hyperinflation"),
    ("Lung/hypoinflation", "hypoinflation"),
    ("Calcinosis/aorta", "aortic atherosclerosis"),
    ("Calcinosis/lung/hilum/lymph nodes/right", "calcinosis"),
    ("Diaphragm/right/elevated", "elevated diaphragm"),
    ("Catheters, Indwelling/left", "catheter"),
    ("Hernia, Hiatal/large", "hiatal hernia"),
    ("Some Heading, Unknown", "unknown some heading"),
    ("Fractures, Bone/ribs/left/healed", "fracture"),
])
def test_normalised_names(term, name):
    assert parse_mesh_term(term).name == name


def test_labels_drop_non_findings_and_deduplicate():
    assert normalised_labels(["No Indexing"]) == ()
    assert normalised_labels(["Cardiomegaly/mild", "Cardiac Shadow/enlarged", "normal"]) == ("cardiomegaly", "normal")
    assert parse_mesh_term("Fractures, Bone/ribs/left/healed").has("healed")


def test_empty_term_is_an_error():
    with pytest.raises(ValueError, match="term"):
        parse_mesh_term(" / ")


def test_finding_sides_of_mesh_terms():
    from medseek.data.mesh import finding_sides

    sides = finding_sides(["Pleural Effusion/right/small", "Pleural Effusion/left",
                           "Pulmonary Atelectasis/base/bilateral/mild", "Cardiomegaly/mild",
                           "Opacity/lung/base/left", "No Indexing"])
    assert sides == {"pleural effusion": {"left", "right"},
                     "atelectasis": {"left", "right"}, "cardiomegaly": frozenset(),
                     "opacity": {"left"}}
