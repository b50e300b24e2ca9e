"""Section and sentence splitting of radiology reports."""

import pytest

from medseek.text.sections import sentence_spans, split_sections, split_sentences


def test_headed_report_any_case_and_separator():
    text = (
        "EXAM: Chest PA and lateral\n"
        "Clinical History: cough\n"
        "comparison - 2010 study\n"
        "Findings: The heart is normal. The lungs are clear.\n"
        "IMPRESSION\n"
        "No acute disease."
    )
    assert split_sections(text) == {
        "technique": "Chest PA and lateral",
        "history": "cough",
        "comparison": "2010 study",
        "findings": "The heart is normal. The lungs are clear.",
        "impression": "No acute disease.",
    }


def test_inline_headings_and_synonyms():
    text = "Indication: fever. FINDINGS: Mild cardiomegaly. CONCLUSION: Cardiomegaly."
    assert split_sections(text) == {
        "indication": "fever.",
        "findings": "Mild cardiomegaly.",
        "impression": "Cardiomegaly.",
    }


def test_heading_words_inside_prose_are_not_headings():
    # "findings" and "impression" used as ordinary words: no colon, not at a line start
    text = "No acute findings in this study, and the impression is of a normal chest."
    assert split_sections(text) == {"preamble": text}


def test_preamble_repeated_heading_and_blank():
    out = split_sections("Chest x-ray.\nFindings: one.\nFindings: two.")
    assert out == {"preamble": "Chest x-ray.", "findings": "one. two."}
    assert split_sections("   ") == {}
    with pytest.raises(TypeError):
        split_sections(None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Heart is normal. Lungs are clear.", ["Heart is normal.", "Lungs are clear."]),
        ("A 2.5 cm nodule, e.g. a granuloma. Stable.",
         ["A 2.5 cm nodule, e.g. a granuloma.", "Stable."]),
        ("i.e. no change vs. prior. Next one.", ["i.e. no change vs. prior.", "Next one."]),
        ("Discussed with Dr. XXXX at XXXX. No effusion.",
         ["Discussed with Dr. XXXX at XXXX.", "No effusion."]),
        ("Stable XXXX. XXXX are intact.", ["Stable XXXX.", "XXXX are intact."]),
        ("1. Cardiomegaly. 2. No effusion.", ["1. Cardiomegaly.", "2. No effusion."]),
        ("Pneumothorax? No. Clear!", ["Pneumothorax?", "No.", "Clear!"]),
        ("first line\n\nsecond line", ["first line", "second line"]),
        ("approx. 3 mm at T12. Lungs clear", ["approx. 3 mm at T12.", "Lungs clear"]),
        (" . .. ", []),
        ("", []),
    ],
)
def test_sentences(text, expected):
    assert split_sentences(text) == expected


def test_spans_index_the_original_text():
    text = "  Heart normal.   Lungs clear.  "
    spans = sentence_spans(text)
    assert [text[s:e] for s, e in spans] == ["Heart normal.", "Lungs clear."]
    assert spans[0][0] == 2
