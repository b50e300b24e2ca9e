"""Split radiology reports into sections and sentences.

Reports arrive either already structured (the IU XML carries one element per section)
or as headed free text such as ``"FINDINGS: ... IMPRESSION: ..."``. :func:`split_sections`
recognises the usual headings in any case, with a colon, a dash or on a line of their
own, and maps synonyms onto one canonical name (``"CONCLUSION"`` -> ``impression``).

:func:`split_sentences` cuts prose into sentences without breaking on abbreviations
(``e.g.``, ``approx.``, ``Dr.``), decimals (``2.5 cm``), enumerations (``1. ...``) or the
``XXXX`` tokens that replace names and dates in anonymised reports.
"""

from __future__ import annotations

import re

# canonical section name -> heading spellings (lower case, single spaces)
SECTION_SYNONYMS: dict[str, tuple[str, ...]] = {
    "comparison": ("comparison", "comparisons", "prior", "priors", "prior studies"),
    "indication": (
        "indication", "indications", "reason for exam", "reason for study",
        "reason for examination", "clinical indication",
    ),
    "history": ("history", "clinical history", "clinical information", "clinical data"),
    "technique": ("technique", "procedure", "views", "exam", "examination", "study"),
    "findings": ("findings", "finding", "report", "description"),
    "impression": (
        "impression", "impressions", "conclusion", "conclusions", "summary",
        "assessment", "opinion", "diagnosis",
    ),
}

_HEADING_TO_SECTION = {
    spelling: name for name, spellings in SECTION_SYNONYMS.items() for spelling in spellings
}
_HEADING_ALTERNATION = "|".join(
    sorted((re.escape(s).replace(r"\ ", r"\s+") for s in _HEADING_TO_SECTION), key=len, reverse=True)
)
# A heading is a known word at the start of the text, of a line, or of a sentence,
# followed by ':' or '-' (any case), or standing alone on its line.
_HEADING_RE = re.compile(
    rf"(?:^|(?<=\n)|(?<=[.!?]\s))[ \t]*(?P<name>{_HEADING_ALTERNATION})"
    rf"(?:[ \t]*(?::|-(?=\s))|[ \t]*(?=\n|$))[ \t]*",
    re.IGNORECASE,
)

# Tokens after which a period does not end a sentence (compared in lower case, no dot).
ABBREVIATIONS = frozenset(
    # deliberately short: "AP." or "no." often do end a sentence in a report
    "e.g i.e vs approx appr dr mr mrs ms fig figs cf al ca incl esp resp".split()
)

_SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)|\n\s*\n")


def split_sections(text: str) -> dict[str, str]:
    """Split headed report text into canonical sections.

    Parameters
    ----------
    text : str
        Free text, e.g. ``"Findings: Heart is normal. IMPRESSION - No acute disease."``.

    Returns
    -------
    dict of str to str
        Canonical section name (``comparison``, ``indication``, ``history``,
        ``technique``, ``findings``, ``impression``) to its whitespace-normalised text,
        in order of appearance. Text before the first heading goes to ``"preamble"``;
        a heading that appears twice has its parts joined with a space. A text with no
        heading at all is returned as ``{"preamble": text}`` (or ``{}`` when blank).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    sections: dict[str, str] = {}

    def put(name: str, body: str) -> None:
        body = " ".join(body.split())
        if body:
            sections[name] = f"{sections[name]} {body}" if sections.get(name) else body

    matches = list(_HEADING_RE.finditer(text))
    put("preamble", text[: matches[0].start()] if matches else text)
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        name = _HEADING_TO_SECTION[" ".join(m.group("name").lower().split())]
        put(name, text[m.end():end])
    return sections


def _ends_sentence(text: str, dot: int) -> bool:
    """Whether the terminator at ``text[dot]`` closes a sentence."""
    if text[dot] != ".":
        return True
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    token = text[start:dot].lower().lstrip("([\"'")
    if token in ABBREVIATIONS:
        return False
    if len(token) == 1 and token.isalpha():  # initials, the "g" of "e.g"
        return False
    # "1." or "2)" opening an enumerated item belongs to the item that follows it
    if token.isdigit() and len(token) <= 2:
        before = text[:start].rstrip()
        if not before or before[-1] in ".!?:;\n" or text[start - 1] == "\n":
            return False
    return True


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the sentences of ``text``, whitespace trimmed.

    A sentence ends at ``.``, ``!`` or ``?`` followed by whitespace or the end of the
    text, or at a blank line. A period does not end a sentence after an abbreviation
    in :data:`ABBREVIATIONS`, after a single letter, inside a number (``2.5``, since no
    space follows) or after an enumeration number such as the ``1.`` of ``"1. Clear
    lungs."``. Anonymisation tokens (``XXXX``) are ordinary words: ``"Dr. XXXX"`` stays
    one sentence, ``"... XXXX. Heart ..."`` is two.
    """
    spans = []
    start = 0
    for m in _SENTENCE_END_RE.finditer(text):
        if m.group().strip() and not _ends_sentence(text, m.start()):
            continue
        spans.append((start, m.end()))
        start = m.end()
    spans.append((start, len(text)))
    out = []
    for s, e in spans:
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s < e and any(ch.isalnum() for ch in text[s:e]):
            out.append((s, e))
    return out


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (see :func:`sentence_spans` for the rules)."""
    return [text[s:e] for s, e in sentence_spans(text)]
