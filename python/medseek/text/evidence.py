"""Finding extraction with NegEx-style negation and uncertainty.

:func:`extract_evidence` reads report text sentence by sentence. In each sentence it
finds the wordings of the lexicon's findings and the trigger phrases around them:

- a *pre* trigger ("no", "without", "negative for", "possible") governs the findings
  that follow it, a *post* trigger ("has resolved", "cannot be excluded") those before
  it, until a scope terminator ("but", "however", "except", ";") or the sentence end;
- overlapping triggers resolve to the longest ("cannot exclude" is uncertainty, not the
  negation "not"); pseudo-triggers ("no change in") block the triggers they overlap;
- implied negations ("the lungs are clear", "heart size is normal") add negated
  evidence for the findings they deny.

Negation wins over uncertainty ("no definite effusion" is negated). Each mention
becomes one :class:`Evidence` with the location, laterality and severity words
nearest to it within the same clause. :func:`concept_vector` turns a report's
evidence into the multi-hot concept vector used for concept-space retrieval and for
explaining matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np

from . import lexicon as lx
from .sections import sentence_spans


@dataclass(frozen=True)
class Evidence:
    """One mention of a finding.

    Attributes
    ----------
    finding : str
        Canonical finding name (a key of :data:`medseek.text.lexicon.FINDINGS_BY_NAME`).
    location, laterality, severity : str or None
        Canonical attribute values (see the lexicon), ``None`` when not stated.
    negated : bool
        The finding is said to be absent.
    uncertain : bool
        The finding is hedged ("possible", "may represent"); never True with ``negated``.
    sentence : str
        The sentence holding the mention.
    span : tuple of int
        ``(start, end)`` character offsets of the mention in the text passed to
        :func:`extract_evidence`.
    implied : bool
        True for a negation implied by a normal statement ("the lungs are clear"
        denies opacity); the span is then that statement.
    """

    finding: str
    location: str | None
    laterality: str | None
    severity: str | None
    negated: bool
    uncertain: bool
    sentence: str
    span: tuple[int, int]
    implied: bool = False

    @property
    def positive(self) -> bool:
        """Asserted as present: neither negated nor uncertain."""
        return not (self.negated or self.uncertain)


def _compile(patterns: Iterable[str]) -> re.Pattern[str]:
    # (?<!\w)/(?!\w) rather than \b so that triggers such as "?" and ";" also match
    return re.compile(r"(?<!\w)(?:" + "|".join(patterns) + r")(?!\w)")


_TRIGGERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("neg_pre", _compile(lx.NEGATION_PRE)),
    ("neg_post", _compile(lx.NEGATION_POST)),
    ("unc_pre", _compile(lx.UNCERTAINTY_PRE)),
    ("unc_post", _compile(lx.UNCERTAINTY_POST)),
    ("pseudo", _compile(lx.PSEUDO_TRIGGERS)),
    ("term", _compile(lx.SCOPE_TERMINATORS)),
)
_ATTRIBUTES = {
    "location": [(name, _compile(p)) for name, p in lx.LOCATIONS.items()],
    "laterality": [(name, _compile(p)) for name, p in lx.LATERALITY.items()],
    "severity": [(name, _compile(p)) for name, p in lx.SEVERITY.items()],
}
_IMPLIED = tuple((_compile([p]), names) for p, names in lx.IMPLIED_NEGATIONS)


def _longest_first(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Greedy non-overlapping selection, longest spans first, returned in text order."""
    kept: list[tuple[int, int, str]] = []
    for s, e, kind in sorted(spans, key=lambda t: (t[0] - t[1], t[0])):
        # the same words may be two kinds of trigger ("versus" governs both sides)
        if all(e <= ks or s >= ke or (s, e) == (ks, ke) for ks, ke, _ in kept):
            kept.append((s, e, kind))
    return sorted(kept)


def _triggers(low: str) -> list[tuple[int, int, str]]:
    found = [(m.start(), m.end(), kind) for kind, rx in _TRIGGERS for m in rx.finditer(low)]
    return [t for t in _longest_first(found) if t[2] != "pseudo"]


def _mentions(low: str, findings: Sequence[lx.Finding]) -> list[tuple[int, int, str]]:
    """Finding matches; a match inside a longer one that subsumes its finding is dropped."""
    raw = [(m.start(), m.end(), f.name) for f in findings for m in f.regex.finditer(low)]
    out = []
    for s, e, name in raw:
        covered = any(
            os <= s and e <= oe and (oe - os) > (e - s)
            and name in lx.FINDINGS_BY_NAME[other].subsumes
            for os, oe, other in raw
        )
        # the same finding matched twice over one stretch (two of its patterns): keep the longest
        dup = any(
            other == name and os <= s and e <= oe and (os, oe) != (s, e) for os, oe, other in raw
        )
        if not covered and not dup and (s, e, name) not in out:
            out.append((s, e, name))
    return sorted(out)


# a post trigger reaches back at most this many words, and not across a comma:
# "left basal opacity, atelectasis versus pneumonia" hedges atelectasis, not the opacity
POST_SCOPE_WORDS = 4


def _in_scope(low: str, triggers, kinds_pre, kinds_post, start: int, end: int) -> bool:
    """Whether a trigger reaches the mention ``[start, end)``: a pre trigger that ends
    before the mention ends (before it, or inside it as in "heart is not enlarged"), or a
    post trigger shortly after it, with no scope terminator in between."""

    def blocked(lo: int, hi: int) -> bool:
        return any(k == "term" and lo <= s and e <= hi for s, e, k in triggers)

    for ts, te, kind in triggers:
        if kind in kinds_pre and te <= end and not blocked(te, start):
            return True
        if kind in kinds_post and ts >= end and not blocked(end, ts):
            gap = low[end:ts]
            if "," not in gap and len(gap.split()) <= POST_SCOPE_WORDS:
                return True
    return False


def _clause(low: str, triggers, start: int, end: int) -> tuple[int, int]:
    """The stretch around a mention that its attributes are read from: bounded by scope
    terminators and by commas, since a list item's words describe that item only."""
    bounds = [(s, e) for s, e, k in triggers if k == "term"]
    bounds += [(m.start(), m.end()) for m in re.finditer(r",", low)]
    lo = max((e for s, e in bounds if e <= start), default=0)
    hi = min((s for s, e in bounds if s >= end), default=len(low))
    return lo, hi


def _nearest(kind: str, low: str, start: int, end: int, lo: int, hi: int) -> str | None:
    best: tuple | None = None
    for name, rx in _ATTRIBUTES[kind]:
        for m in rx.finditer(low, lo, hi):
            if m.start() < end and m.end() > start:
                dist = 0  # the attribute is part of the mention ("bibasilar atelectasis")
            else:
                dist = start - m.end() if m.end() <= start else m.start() - end
            # a generic place ("lung") only when nothing more specific is said
            key = (name in lx.GENERIC_LOCATIONS, dist, -(m.end() - m.start()), name)
            if best is None or key < best:
                best = key
    return best[-1] if best else None


# a side word after one of these reads as a post-modifier of the finding before it:
# "effusion on the right", "opacity in the left base", "scarring at both apices"
_POST_SIDE = re.compile(r"(?:on|in|at|of|to|involving|within)\s+(?:the\s+)?$")


def _laterality(low: str, mentions: list[tuple[int, int, str]], idx: int, lo: int,
                hi: int) -> str | None:
    """The side of ``mentions[idx]``, read from the side words of its clause ``[lo, hi)``.

    The nearest word is not enough: in "left lower lobe atelectasis and right effusion"
    "right" is nearer to atelectasis than "left" is. So each side word first goes to one
    mention of the clause: a word inside a mention to that mention; a post-modifier
    ("on the right", "bilaterally") to the mention before it; any other word to the
    first mention after it ("right effusion"), or to the one before when none follows.
    A mention takes the nearest word it was given; a mention given none takes the
    nearest side word of the clause, so that coordinated findings share a stated side
    ("right upper lobe opacity and atelectasis").
    """
    s, e, _ = mentions[idx]
    spans = [(ms, me) for ms, me, _ in mentions if lo <= ms and me <= hi]
    words = [(m.start(), m.end(), name) for name, rx in _ATTRIBUTES["laterality"]
             for m in rx.finditer(low, lo, hi)]
    best: tuple | None = None
    for ws, we, name in words:
        inside = [(ms, me) for ms, me in spans if ws < me and we > ms]
        before = [(ms, me) for ms, me in spans if me <= ws]
        after = [(ms, me) for ms, me in spans if ms >= we]
        post = low[ws:we].endswith("ly") or _POST_SIDE.search(low, max(lo, ws - 24), ws)
        if inside:
            owner = inside[0]
        elif before and (post or not after):
            owner = before[-1]
        elif after:
            owner = after[0]
        else:
            continue
        if owner != (s, e):
            continue
        dist = 0 if inside else (s - we if we <= s else ws - e)
        key = (dist, -(we - ws), name)
        if best is None or key < best:
            best = key
    if best is not None:
        return best[-1]
    return _nearest("laterality", low, s, e, lo, hi)


@lru_cache(maxsize=1 << 16)
def _analyse_sentence(sentence: str, findings: tuple[lx.Finding, ...]) -> tuple[Evidence, ...]:
    """Evidence of one sentence with spans relative to it. Cached: reports repeat
    boilerplate sentences ("The lungs are clear.") very often."""
    low = sentence.lower()
    if len(low) != len(sentence):  # a few Unicode letters change length when lowered
        low = "".join(ch.lower() if len(ch.lower()) == 1 else ch for ch in sentence)
    trig = _triggers(low)
    out = []
    mentions = _mentions(low, findings)
    for idx, (s, e, name) in enumerate(mentions):
        negated = _in_scope(low, trig, {"neg_pre"}, {"neg_post"}, s, e)
        uncertain = not negated and _in_scope(low, trig, {"unc_pre"}, {"unc_post"}, s, e)
        lo, hi = _clause(low, trig, s, e)
        out.append(Evidence(
            finding=name,
            location=_nearest("location", low, s, e, lo, hi),
            laterality=_laterality(low, mentions, idx, lo, hi),
            severity=_nearest("severity", low, s, e, lo, hi),
            negated=negated,
            uncertain=uncertain,
            sentence=sentence,
            span=(s, e),
        ))
    # a finding explained by another in the same sentence is not reported separately
    explained = {n for ev in out if not ev.negated
                 for n in lx.FINDINGS_BY_NAME[ev.finding].explains}
    out = [ev for ev in out if ev.finding not in explained]
    wanted = {f.name for f in findings}
    for rx, names in _IMPLIED:
        for m in rx.finditer(low):
            if _in_scope(low, trig, {"unc_pre", "neg_pre"}, {"unc_post"}, m.start(), m.end()):
                continue  # "possibly clear lungs", "not normal in size"
            for name in names:
                if name in wanted:
                    out.append(Evidence(name, None, None, None, True, False, sentence,
                                        (m.start(), m.end()), implied=True))
    return tuple(out)


def extract_evidence(text: str, findings: Sequence[lx.Finding] = lx.FINDINGS) -> list[Evidence]:
    """Find every mention of a lexicon finding in ``text``.

    Parameters
    ----------
    text : str
        Report text (any sections; see :func:`medseek.text.sections.split_sections`).
    findings : sequence of Finding
        The findings to look for; by default the whole lexicon.

    Returns
    -------
    list of Evidence
        In order of appearance; implied negations follow the explicit mentions of
        their sentence.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    findings = tuple(findings)
    out: list[Evidence] = []
    for s0, s1 in sentence_spans(text):
        out.extend(
            replace(ev, span=(s0 + ev.span[0], s0 + ev.span[1]))
            for ev in _analyse_sentence(text[s0:s1], findings)
        )
    return out


def concept_vector(
    evidences: Iterable[Evidence], concepts: Sequence[str], uncertain_weight: float = 0.0
) -> np.ndarray:
    """Multi-hot vector of the findings a report asserts.

    Parameters
    ----------
    evidences : iterable of Evidence
        One report's evidence (from :func:`extract_evidence`).
    concepts : sequence of str
        Finding names giving the vector's axes, e.g. ``medseek.text.lexicon.TOP14``.
    uncertain_weight : float
        Value given to a finding mentioned only with uncertainty (0 by default: a
        hedged finding is not asserted). Negated mentions always give 0.

    Returns
    -------
    np.ndarray
        ``(len(concepts),)`` float32, 1 for each concept with a positive mention.
    """
    if not 0.0 <= uncertain_weight <= 1.0:
        raise ValueError(f"uncertain_weight must be in [0, 1], got {uncertain_weight}")
    index = {name: i for i, name in enumerate(concepts)}
    if len(index) != len(concepts):
        raise ValueError("concepts contains duplicates")
    vec = np.zeros(len(concepts), dtype=np.float32)
    for ev in evidences:
        i = index.get(ev.finding)
        if i is None or ev.negated:
            continue
        vec[i] = max(vec[i], uncertain_weight if ev.uncertain else 1.0)
    return vec
