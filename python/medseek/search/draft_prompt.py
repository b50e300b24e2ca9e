"""The concept-enriched context of a draft as a chat prompt, and the reading of the answer.

The deployment generator of CEMRAG hands the same evidence the offline composition uses
(``medseek.search.draft``) to a chat model: the image's concepts with their calibrated
scores and sides, the retrieved reports with their item ids, and the composed draft as a
starting point. The model is asked to end every sentence with its grounding,
``[source: <item id or concepts>; concepts: <names>]``; :func:`read_grounded_answer` reads
that back and checks each sentence against the concepts with the same rule as the
composition (:func:`medseek.search.draft.contradiction`), so a model's sentence that the
image contradicts is dropped with its reason, exactly as a retrieved one is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from medseek.text.lexicon import FINDINGS_BY_NAME

from .draft import (ConceptSupport, Draft, DraftSentence, DraftSettings, DroppedSentence,
                    RetrievedReport, _sentence_group, _support, contradiction, sentence_claims)

__all__ = ["SYSTEM_PROMPT", "draft_messages", "read_grounded_answer"]

SYSTEM_PROMPT = (
    "You draft chest radiograph reports for a radiologist to review. Use only the evidence "
    "given: the image concepts (a calibrated score above 0 means the image shows the "
    "finding) and the retrieved reports of similar cases. Never state a finding the image "
    "concepts score absent, never deny one they score present, and keep the stated sides. "
    "Write one sentence per line and end each with its grounding in brackets: "
    "[source: <report id, or concepts>; concepts: <concept names, comma separated>].")


def _concept_lines(scores: Mapping[str, float], sides: Mapping[str, str],
                   mentioned: set[str], settings: DraftSettings) -> list[str]:
    """Present concepts (strongest first), then absent ones the retrieved reports mention."""
    rows = []
    for name, s in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        if name not in FINDINGS_BY_NAME:
            continue
        if s > settings.present_above:
            side = f", {sides[name]}" if name in sides else ""
            rows.append(f"- {name}: {s:.2f} (present{side})")
        elif s <= settings.absent_at_most and name in mentioned:
            rows.append(f"- {name}: {s:.2f} (absent)")
    return rows or ["- (no finding scored present)"]


def draft_messages(scores: Mapping[str, float], reports: Sequence[RetrievedReport],
                   draft: Draft, settings: DraftSettings = DraftSettings()) -> list[dict]:
    """OpenAI chat-completions ``messages`` for a draft (module docstring).

    Parameters
    ----------
    scores : mapping of concept name to calibrated score
    reports : the retrieved reports, nearest first
    draft : the composed draft (``compose_draft`` of the same inputs)
    settings : the thresholds the draft was composed with

    Returns
    -------
    list of dict
        ``[{"role": "system", ...}, {"role": "user", ...}]``.
    """
    mentioned = {f for r in reports for c in [sentence_claims(r.text)]
                 for f in (*c.asserted, *c.hedged, *c.denied)}
    lines = ["Image concepts:", *_concept_lines(scores, draft.sides, mentioned, settings), "",
             "Retrieved reports, nearest first:"]
    lines += [f"[{r.item_id}] (similarity {r.score:.3f}) {' '.join(r.text.split())}"
              for r in reports] or ["(none)"]
    lines += ["", "Draft composed from them (revise it; keep what the evidence supports):"]
    for s in draft.sentences:
        source = s.source_id or "concepts"
        names = ", ".join(c.concept for c in s.support)
        lines.append(f"{s.text} [source: {source}; concepts: {names}]")
    lines += ["", "Write the findings of the report."]
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n".join(lines)}]


_GROUNDED = re.compile(r"\s*(?P<text>[^\[\n]+?)\s*(?:\[source:\s*(?P<source>[^;\]]*)"
                       r"(?:;\s*concepts:\s*(?P<concepts>[^\]]*))?\])?\s*(?:\n|$)")


def read_grounded_answer(answer: str, scores: Mapping[str, float],
                         reports: Sequence[RetrievedReport], sides: Mapping[str, str],
                         settings: DraftSettings = DraftSettings()) -> Draft:
    """A chat model's answer as a :class:`Draft`: one sentence per line with its
    ``[source: ...; concepts: ...]``; a sentence the concepts contradict is dropped with
    the reason, one without grounding or citing an unknown report is kept but flagged."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be str, got {type(answer).__name__}")
    known = {r.item_id for r in reports}
    kept, dropped = [], []
    for m in _GROUNDED.finditer(answer):
        text = m.group("text").strip()
        if not any(ch.isalnum() for ch in text):
            continue
        source = (m.group("source") or "").strip()
        claims = sentence_claims(text)
        reason = contradiction(claims, scores, sides, settings)
        if reason is not None:
            dropped.append(DroppedSentence(text, source, reason))
            continue
        note = ""
        if m.group("source") is None:
            note = "the model gave no grounding"
        elif source not in known and source != "concepts":
            note = f"cites {source!r}, which is not a retrieved report"
        support = _support(claims, scores)
        cited = [c.strip() for c in (m.group("concepts") or "").split(",") if c.strip()]
        support += tuple(ConceptSupport(c, scores.get(c), "cited") for c in cited
                         if c not in {s.concept for s in support})
        kept.append(DraftSentence(text, source if source in known else "", "generated",
                                  _sentence_group(text, claims), support, note))
    return Draft(tuple(kept), tuple(dropped), dict(sides))
