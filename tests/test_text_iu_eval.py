"""The extractor against the human MeSH labels of all 3,955 real IU chest X-ray reports.

The reports are read at run time from the installed torchxrayvision wheel; only
aggregate numbers are asserted here.
"""

import pytest

from medseek.text import lexicon as lx
from medseek.text.evaluate import evaluate_against_mesh, format_table


@pytest.fixture(scope="module")
def reports():
    iu = pytest.importorskip("medseek.data.iu")
    try:
        return iu.load_iu_reports()
    except FileNotFoundError as exc:  # torchxrayvision not installed
        pytest.skip(str(exc))


def test_top14_are_the_most_frequent_finding_headings(reports):
    from collections import Counter

    excluded = {"normal", "no indexing", "technical quality of image unsatisfactory",
                "lung", "thoracic vertebrae", "spine", "aorta", "markings", "diaphragm"}
    counts = Counter(
        h for r in reports for h in {m.split("/")[0].strip() for m in r.mesh_major}
        if h.lower() not in excluded
    )
    top = [h for h, _ in counts.most_common(14)]
    assert top == [lx.FINDINGS_BY_NAME[n].headings[0] for n in lx.TOP14]


def test_micro_f1_against_mesh(reports):
    result = evaluate_against_mesh(reports)
    print("\n" + format_table(result))
    assert result["n_reports"] == 3955
    assert result["micro"]["f1"] >= 0.85
    # every finding carries its weight: none is left near chance
    assert min(v["f1"] for v in result["per_finding"].values()) >= 0.7
    # counting negated mentions as positives must hurt: negation is doing real work
    no_negation = evaluate_against_mesh(reports, use_negation=False)
    assert no_negation["micro"]["precision"] < result["micro"]["precision"] - 0.1


def test_uncertain_policy_is_an_option(reports):
    subset = reports[:300]
    strict = evaluate_against_mesh(subset, uncertain="negative")["micro"]
    loose = evaluate_against_mesh(subset, uncertain="positive")["micro"]
    assert loose["tp"] + loose["fp"] >= strict["tp"] + strict["fp"]
    with pytest.raises(ValueError, match="uncertain"):
        evaluate_against_mesh(subset, uncertain="maybe")
