"""Concept-grounded report drafts from retrieved reports (CEMRAG, offline generator).

CEMRAG conditions report generation on two things: the reports of the most similar prior
cases (retrieval) and the query image's own decomposition into clinical concepts. Here the
generator is retrieval-based composition, in the CXR-RePaiR / X-REM family: it selects
and orders *sentences* of the retrieved reports rather than writing new text, so every
sentence of a draft is traceable to one stored report, and the image's calibrated finding
concepts decide which sentences may be said:

1. each sentence of each retrieved report is read by :func:`medseek.text.extract_evidence`
   into the findings it asserts (with their side), denies (explicitly or by a normal
   statement such as "the lungs are clear") or hedges;
2. a sentence is *contradicted*, and dropped with the reason, when it asserts or hedges a
   finding the image scores absent (``score <= absent_at_most``), denies one the image
   scores present (``score > present_above``), or states the opposite side of a present
   finding's resolved side;
3. for each finding the image shows, strongest first, the best-ranked surviving sentence
   asserting it is kept; when no retrieved report words it, a template sentence from the
   concept itself is written (grounded on the concept alone);
4. surviving negative sentences are kept when they deny something not yet covered
   (de-duplication by content: a second "no pleural effusion" adds nothing) and nothing
   the draft already asserts (no concept settles a finding the image has no concept for,
   so the nearer report's sentence stands and the clashing one is dropped), and the
   nearest report's sentences that name no finding ("the mediastinum is unremarkable")
   or assert only findings the image leaves undecided (scores between the two
   thresholds: there the nearest case's word stands, as in plain retrieval);
5. each organ group with no present finding and no sentence yet gets one normal sentence;
6. sentences are ordered by organ group (heart, mediastinum, lungs, pleura, bones,
   devices, other), findings before denials.

Laterality: the finding head of a shipped model has no side axes, so a present finding's
side is voted by the retrieved reports that assert it (each vote weighted by its report's
rank weight ``1 / rank``); a majority of more than half of the weight decides, else the
side stays unknown and no sentence is dropped for its side. A caller with side evidence of
its own (a bank with ``left <finding>`` axes, a region head) passes ``sides``.

All functions are pure; the serving side (``medseek.serve.draft_service``) feeds them the
k nearest stored images' report texts and the query embedding's ``ConceptBank`` scores.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from medseek.text.evidence import Evidence, extract_evidence
from medseek.text.lexicon import FINDINGS_BY_NAME
from medseek.text.sections import sentence_spans

__all__ = ["ConceptSupport", "Draft", "DraftSentence", "DraftSettings", "DroppedSentence",
           "RetrievedReport", "compose_draft", "concept_sentence", "contradiction",
           "organ_group", "resolve_sides", "sentence_claims", "NORMAL_SENTENCES"]

#: organ groups in report order; a finding's group decides where its sentence goes
GROUPS: dict[str, tuple[str, ...]] = {
    "heart": ("cardiomegaly", "enlarged cardiac silhouette", "pericardial effusion"),
    "mediastinum": ("tortuous aorta", "atherosclerosis", "lymphadenopathy", "hiatal hernia"),
    "lungs": ("opacity", "airspace disease", "consolidation", "infiltrate", "pneumonia",
              "pulmonary edema", "pulmonary congestion", "density", "atelectasis", "nodule",
              "mass", "calcified granuloma", "granuloma", "granulomatous disease", "calcinosis",
              "emphysema", "copd", "hyperinflation", "hypoinflation", "interstitial markings",
              "fibrosis", "cicatrix"),
    "pleura": ("pleural effusion", "pneumothorax", "costophrenic blunting",
               "pleural thickening", "elevated hemidiaphragm", "flattened diaphragm"),
    "bones": ("fracture", "spine degeneration", "scoliosis", "kyphosis", "deformity",
              "costal cartilage calcification"),
    "devices": ("indwelling catheter", "implanted device", "surgical material",
                "post sternotomy", "tube"),
}
GROUP_ORDER = (*GROUPS, "other")
_GROUP_OF = {name: g for g, names in GROUPS.items() for name in names}
#: one normal sentence per group, written here (not taken from any corpus); a group absent
#: from this table (devices, other) gets none
NORMAL_SENTENCES: dict[str, str] = {
    "heart": "The heart is normal in size.",
    "mediastinum": "The mediastinum is unremarkable.",
    "lungs": "The lungs are clear.",
    "pleura": "There is no pleural effusion or pneumothorax.",
    "bones": "No acute bony abnormality.",
}
# words placing a sentence that names no finding ("the osseous structures are intact")
_NEUTRAL_GROUP = (
    (re.compile(r"\b(?:heart|cardiac|cardiomediastinal)\b"), "heart"),
    (re.compile(r"\b(?:mediastin\w*|hil(?:um|a|ar)|aort\w*)\b"), "mediastinum"),
    (re.compile(r"\b(?:lungs?|pulmonary|parenchym\w*|airspace)\b"), "lungs"),
    (re.compile(r"\b(?:pleura\w*|costophrenic|diaphragm\w*)\b"), "pleura"),
    (re.compile(r"\b(?:osseous|bon(?:e|y|es)|skelet\w*|spine|ribs?|thoracic)\b"), "bones"),
)
_OPPOSITE = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class RetrievedReport:
    """The report of one retrieved case: its stored item id, retrieval score and text."""

    item_id: str
    score: float
    text: str


@dataclass(frozen=True)
class DraftSettings:
    """Thresholds of the composition, on the ConceptBank's calibrated score scale.

    Attributes
    ----------
    present_above : float
        A finding is present when its score is above this (0: the calibrated threshold).
    absent_at_most : float
        A finding is absent when its score is at most this; between the two it is
        undecided, and sentences about it are neither dropped nor preferred.
    max_neutral : int
        Sentences naming no finding taken from the nearest report.
    """

    present_above: float = 0.0
    absent_at_most: float = 0.0
    max_neutral: int = 2

    def __post_init__(self) -> None:
        if not self.absent_at_most <= self.present_above:
            raise ValueError(f"absent_at_most ({self.absent_at_most}) must be <= present_above "
                             f"({self.present_above})")
        if self.max_neutral < 0:
            raise ValueError(f"max_neutral must be >= 0, got {self.max_neutral}")


@dataclass(frozen=True)
class ConceptSupport:
    """A concept behind a sentence: its image score and what the sentence says of it
    (``"present"`` asserted, ``"absent"`` denied); ``score`` None when the image has no
    concept of that name (the sentence is then not checked on it)."""

    concept: str
    score: float | None
    stance: str


@dataclass(frozen=True)
class DraftSentence:
    """One sentence of a draft and its grounding.

    ``kind``: ``"retrieved"`` (verbatim from report ``source_id``), ``"concept"`` (a
    template written from a present concept, ``source_id`` empty) or ``"normal"`` (the
    normal sentence of an organ group nothing else covered). ``note`` says why it is
    flagged (a finding the image has no concept for), empty otherwise."""

    text: str
    source_id: str
    kind: str
    group: str
    support: tuple[ConceptSupport, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class DroppedSentence:
    """A retrieved sentence left out because the image's concepts contradict it."""

    text: str
    source_id: str
    reason: str


@dataclass(frozen=True)
class Draft:
    sentences: tuple[DraftSentence, ...]
    dropped: tuple[DroppedSentence, ...]
    sides: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.sentences)


@dataclass(frozen=True)
class _Claims:
    """What one sentence says: asserted (finding -> side or None), denied, hedged."""

    asserted: dict[str, str | None]
    denied: frozenset[str]
    hedged: dict[str, str | None]


def sentence_claims(sentence: str) -> _Claims:
    """Findings a sentence asserts (with side), denies and hedges (module docstring, 1)."""
    asserted: dict[str, str | None] = {}
    hedged: dict[str, str | None] = {}
    denied: set[str] = set()
    for ev in extract_evidence(sentence):
        if ev.negated:
            denied.add(ev.finding)
        else:
            target = hedged if ev.uncertain else asserted
            if target.get(ev.finding) is None:
                target[ev.finding] = ev.laterality
    denied -= set(asserted)  # "no new effusion; small left effusion" asserts it
    return _Claims(asserted, frozenset(denied), hedged)


def organ_group(finding: str) -> str:
    """The organ group of a lexicon finding (``"other"`` when none)."""
    return _GROUP_OF.get(finding, "other")


def _sentence_group(sentence: str, claims: _Claims) -> str:
    named = [*claims.asserted, *claims.hedged, *sorted(claims.denied)]
    if named:
        return min((organ_group(f) for f in named), key=GROUP_ORDER.index)
    low = sentence.lower()
    return next((g for rx, g in _NEUTRAL_GROUP if rx.search(low)), "other")


def contradiction(claims: _Claims, scores: Mapping[str, float], sides: Mapping[str, str],
                  settings: DraftSettings = DraftSettings()) -> str | None:
    """Why the image's concepts contradict a sentence's claims, or None.

    Parameters
    ----------
    claims : from :func:`sentence_claims`
    scores : mapping of concept name to calibrated score (> ``present_above``: present)
    sides : mapping of present finding to its resolved side (left, right, bilateral)
    """
    for finding, side in [*claims.asserted.items(), *claims.hedged.items()]:
        s = scores.get(finding)
        if s is not None and s <= settings.absent_at_most:
            what = "asserts" if finding in claims.asserted else "suggests"
            return f"{what} {finding}, which the image's concepts score absent ({s:.2f})"
        want = sides.get(finding)
        if side in _OPPOSITE and want == _OPPOSITE[side]:
            return f"states {finding} on the {side}; the image's evidence puts it on the {want}"
    for finding in sorted(claims.denied):
        s = scores.get(finding)
        if s is not None and s > settings.present_above:
            return f"denies {finding}, which the image's concepts score present ({s:.2f})"
    return None


def resolve_sides(present: Sequence[str], reports: Sequence[RetrievedReport],
                  given: Mapping[str, str] | None = None) -> dict[str, str]:
    """The side of each present finding: ``given`` first, else the rank-weighted vote of
    the retrieved reports asserting it with a side (a strict majority of the weight; see
    the module docstring). Findings without a decided side are absent from the result."""
    out = {f: s for f, s in (given or {}).items() if s in ("left", "right", "bilateral")}
    for finding in present:
        if finding in out:
            continue
        votes: dict[str, float] = {}
        for rank, report in enumerate(reports, start=1):
            sides = {ev.laterality for ev in extract_evidence(report.text)
                     if ev.finding == finding and ev.positive and ev.laterality}
            for side in sides:
                votes[side] = votes.get(side, 0.0) + 1.0 / rank / len(sides)
        total = sum(votes.values())
        if total:
            side, weight = max(sorted(votes.items()), key=lambda kv: kv[1])
            if weight > total / 2:
                out[finding] = side
    return out


def concept_sentence(finding: str, side: str | None) -> str:
    """The template sentence of a present concept: "There is right pleural effusion."."""
    words = f"{side} {finding}" if side else finding
    return f"There is {words}."


def _support(claims: _Claims, scores: Mapping[str, float]) -> tuple[ConceptSupport, ...]:
    out = [ConceptSupport(f, scores.get(f), "present") for f in claims.asserted]
    out += [ConceptSupport(f, scores.get(f), "present") for f in claims.hedged
            if f not in claims.asserted]
    out += [ConceptSupport(f, scores.get(f), "absent") for f in sorted(claims.denied)]
    return tuple(out)


def _unscored_note(claims: _Claims, scores: Mapping[str, float]) -> str:
    missing = sorted(f for f in {*claims.asserted, *claims.hedged, *claims.denied}
                     if f not in scores)
    return f"not checked against the image: no concept for {', '.join(missing)}" if missing else ""


def compose_draft(scores: Mapping[str, float], reports: Sequence[RetrievedReport], *,
                  sides: Mapping[str, str] | None = None,
                  settings: DraftSettings = DraftSettings()) -> Draft:
    """A grounded draft from the image's concept scores and the retrieved reports.

    Parameters
    ----------
    scores : mapping of str to float
        The query image's calibrated concept scores (``ConceptBank.scores``), by concept
        name (lexicon finding names; other names, such as ``normal``, are ignored).
    reports : sequence of RetrievedReport
        The retrieved cases' reports, nearest first (may be empty: a concepts-only draft).
    sides : mapping of finding to side, optional
        Side evidence of the caller's own, winning over the retrieved reports' vote.
    settings : DraftSettings

    Returns
    -------
    Draft
        Sentences in report order, each with its grounding; the retrieved sentences the
        concepts contradict, each with the reason; the sides used.
    """
    scores = {str(k): float(v) for k, v in scores.items()}
    present = sorted((f for f, s in scores.items()
                      if f in FINDINGS_BY_NAME and s > settings.present_above),
                     key=lambda f: (-scores[f], f))
    resolved = resolve_sides(present, reports, sides)
    kept: list[tuple[DraftSentence, _Claims]] = []
    dropped: list[DroppedSentence] = []
    candidates: list[tuple[int, str, str, _Claims]] = []  # (rank, item id, text, claims)
    seen_text: set[str] = set()
    for rank, report in enumerate(reports):
        for s0, s1 in sentence_spans(report.text):
            text = report.text[s0:s1]
            norm = " ".join(text.lower().split())
            claims = sentence_claims(text)
            reason = contradiction(claims, scores, resolved, settings)
            if reason is not None:
                dropped.append(DroppedSentence(text, report.item_id, reason))
            elif norm not in seen_text:  # the same wording from a further report adds nothing
                candidates.append((rank, report.item_id, text, claims))
            seen_text.add(norm)

    def keep(kind: str, text: str, source: str, claims: _Claims) -> None:
        kept.append((DraftSentence(text, source, kind, _sentence_group(text, claims),
                                   _support(claims, scores), _unscored_note(claims, scores)),
                     claims))

    def covered() -> tuple[set[str], set[str]]:
        said = {f for _, c in kept for f in (*c.asserted, *c.hedged)}
        return said, said | {f for _, c in kept for f in c.denied}

    # 3. each present finding, strongest first: its best-ranked sentence, else a template
    for finding in present:
        if finding in covered()[0]:
            continue
        best = next((c for c in candidates if finding in c[3].asserted), None)
        if best is None:
            text = concept_sentence(finding, resolved.get(finding))
            keep("concept", text, "", sentence_claims(text))
        else:
            candidates.remove(best)
            keep("retrieved", best[2], best[1], best[3])
    # 4. denials of what is not yet covered; asserted findings the image has no concept
    #    for come only from the nearest report (flagged); sentences naming no finding too
    neutral = 0
    for rank, item_id, text, claims in candidates:
        named = {*claims.asserted, *claims.hedged, *claims.denied}
        if not named:
            if rank == 0 and neutral < settings.max_neutral:
                keep("retrieved", text, item_id, claims)
                neutral += 1
            continue
        unscored = {f for f in (*claims.asserted, *claims.hedged) if f not in scores}
        scored_positive = {f for f in (*claims.asserted, *claims.hedged) if f in scores}
        if scored_positive - covered()[0] and rank == 0 and not any(
                f in present for f in scored_positive):
            # undecided findings (absent_at_most < score <= present_above): the nearest
            # report's word stands, as in plain retrieval
            keep("retrieved", text, item_id, claims)
            continue
        if scored_positive:
            continue  # a present finding already has its sentence (step 3)
        if unscored and rank != 0:
            continue
        if not named - covered()[1]:
            continue
        said = covered()[0]
        denied_in_draft = {f for k, c in kept for f in c.denied}
        clash = sorted(claims.denied & said) or sorted(
            {*claims.asserted, *claims.hedged} & denied_in_draft)
        if clash:  # no concept settles it: the nearer report's sentence already stands
            verb = "denies" if claims.denied & said else "asserts"
            dropped.append(DroppedSentence(text, item_id, f"{verb} {clash[0]}, which a "
                                           f"nearer report's sentence in this draft "
                                           f"{'asserts' if verb == 'denies' else 'denies'}"))
            continue
        keep("retrieved", text, item_id, claims)
    # 5. a normal sentence for each group with nothing said and nothing present
    said_groups = {s.group for s, _ in kept}
    present_groups = {organ_group(f) for f in present}
    for group, text in NORMAL_SENTENCES.items():
        if group not in said_groups and group not in present_groups:
            keep("normal", text, "", sentence_claims(text))
    # 6. report order: group, then findings before denials, then as selected
    order = sorted(range(len(kept)), key=lambda i: (
        GROUP_ORDER.index(kept[i][0].group),
        0 if (kept[i][1].asserted or kept[i][1].hedged) else 1, i))
    return Draft(tuple(kept[i][0] for i in order), tuple(dropped), dict(resolved))


def evidence_findings(evidences: Sequence[Evidence]) -> set[str]:
    """Positively asserted findings (neither negated nor hedged) of some evidence."""
    return {ev.finding for ev in evidences if ev.positive}
