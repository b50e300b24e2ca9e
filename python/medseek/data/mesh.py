"""Parse IU/OpenI MeSH *major* terms into structured findings.

A term is a ``/``-separated path: the first component is the MeSH heading
(``"Pulmonary Atelectasis"``, ``"Catheters, Indwelling"``), the rest are qualifiers in
no fixed order: anatomy (``lung``, ``base``, ``upper lobe``, ``hilum``, ``ribs``),
laterality (``left``, ``right``, ``bilateral``), severity (``borderline``, ``mild``,
``small``, ``moderate``, ``large``, ``severe``) and descriptors (``streaky``,
``healed``, ``tortuous``...). :func:`parse_mesh_term` turns one into a
:class:`Finding` whose ``name`` is a normalised finding name (lower case, one name
per visual entity: ``Cardiac Shadow/enlarged`` and ``Cardiomegaly`` both become
``cardiomegaly``); :func:`normalised_labels` gives the sorted label set of a report.
"""

from __future__ import annotations

from dataclasses import dataclass

SIDES = ("left", "right", "bilateral")
ZONES = (
    "apex", "upper lobe", "middle lobe", "lingula", "lower lobe", "base",
    "hilum", "retrocardiac", "costophrenic angle", "paratracheal",
)
# Severity words mapped onto one 0..1 scale; a term with none is "unspecified" (0.55).
SEVERITY = {
    "borderline": 0.2, "minimal": 0.25, "mild": 0.35, "small": 0.35,
    "moderate": 0.65, "large": 0.9, "severe": 0.95, "prominent": 0.55, "enlarged": 0.6,
}
DEFAULT_SEVERITY = 0.55

# Heading (lower case) -> normalised name. Headings absent here are normalised by
# reordering "A, B" into "b a" and lower-casing.
_HEADINGS = {
    "normal": "normal",
    "cardiomegaly": "cardiomegaly",
    "pulmonary atelectasis": "atelectasis",
    "calcinosis": "calcinosis",
    "calcified granuloma": "calcified granuloma",
    "granuloma": "calcified granuloma",
    "granulomatous disease": "granulomatous disease",
    "thoracic vertebrae": "spine degenerative",
    "spine": "spine degenerative",
    "spondylosis": "spine degenerative",
    "osteophyte": "spine degenerative",
    "arthritis": "spine degenerative",
    "cicatrix": "scarring",
    "pleural effusion": "pleural effusion",
    "costophrenic angle": "blunted costophrenic angle",
    "aorta": "tortuous aorta",
    "aorta, thoracic": "tortuous aorta",
    "atherosclerosis": "aortic atherosclerosis",
    "airspace disease": "airspace disease",
    "density": "density",
    "opacity": "opacity",
    "infiltrate": "infiltrate",
    "consolidation": "consolidation",
    "pneumonia": "pneumonia",
    "catheters, indwelling": "catheter",
    "tube, inserted": "tube",
    "surgical instruments": "surgical clips",
    "implanted medical device": "implanted device",
    "medical device": "medical device",
    "stents": "stent",
    "sutures": "sutures",
    "spinal fusion": "spinal fusion",
    "foreign bodies": "foreign body",
    "deformity": "vertebral deformity",
    "scoliosis": "scoliosis",
    "kyphosis": "kyphosis",
    "nodule": "nodule",
    "mass": "mass",
    "fractures, bone": "fracture",
    "technical quality of image unsatisfactory": "technical quality unsatisfactory",
    "pulmonary congestion": "pulmonary congestion",
    "pulmonary edema": "pulmonary edema",
    "heart failure": "pulmonary congestion",
    "emphysema": "emphysema",
    "pulmonary emphysema": "emphysema",
    "pulmonary disease, chronic obstructive": "copd",
    "lung, hyperlucent": "hyperlucent lung",
    "bullous emphysema": "emphysema",
    "hernia, hiatal": "hiatal hernia",
    "bone diseases, metabolic": "osteopenia",
    "osteoporosis": "osteopenia",
    "thickening": "pleural thickening",
    "diaphragmatic eventration": "diaphragmatic eventration",
    "mediastinum": "widened mediastinum",
    "lucency": "lucency",
    "pneumothorax": "pneumothorax",
    "hydropneumothorax": "pneumothorax",
    "hemopneumothorax": "pneumothorax",
    "pulmonary fibrosis": "fibrosis",
    "fibrosis": "fibrosis",
    "lung diseases, interstitial": "interstitial lung disease",
    "cardiac shadow": "cardiomegaly",
    "epicardial fat": "epicardial fat",
    "breast implants": "breast implants",
    "mastectomy": "mastectomy",
    "pneumonectomy": "pneumonectomy",
    "subcutaneous emphysema": "subcutaneous emphysema",
    "pericardial effusion": "pericardial effusion",
    "lumbar vertebrae": "spine degenerative",
    "cervical vertebrae": "spine degenerative",
    "bone and bones": "spine degenerative",
    "pulmonary artery": "enlarged pulmonary artery",
    "shift": "mediastinal shift",
    "blister": "bullae",
    "sulcus": "blunted costophrenic angle",
    "heart atria": "cardiac chamber enlargement",
    "heart ventricles": "cardiac chamber enlargement",
    "lymph nodes": "lymphadenopathy",
    "sclerosis": "bone sclerosis",
}
# Qualifier-driven names for headings whose meaning lives in the first qualifier.
_LUNG_QUALIFIERS = {
    "hypoinflation": "hypoinflation",
    "hyperdistention": "hyperinflation",
    "azygos lobe": "azygos lobe",
    "bullae": "emphysema",
}
_DIAPHRAGM_QUALIFIERS = {"elevated": "elevated diaphragm", "flattened": "flattened diaphragm"}
_MARKINGS_QUALIFIERS = {"bronchovascular": "prominent markings", "interstitial": "interstitial markings"}
_NOT_FINDINGS = {"no indexing"}


@dataclass(frozen=True)
class Finding:
    """One MeSH term in structured form.

    ``name`` is the normalised finding; ``side`` one of :data:`SIDES` or ``""``;
    ``zone`` one of :data:`ZONES` or ``""``; ``severity`` in [0, 1]; ``qualifiers``
    every qualifier of the term (lower case), for descriptors such as ``healed``.
    """

    name: str
    side: str = ""
    zone: str = ""
    severity: float = DEFAULT_SEVERITY
    qualifiers: tuple[str, ...] = ()
    term: str = ""

    def has(self, word: str) -> bool:
        return word in self.qualifiers


def _normalise_heading(heading: str) -> str:
    h = heading.strip().lower()
    if h in _HEADINGS:
        return _HEADINGS[h]
    if ", " in h:
        a, b = h.split(", ", 1)
        return f"{b} {a}"
    return h


def parse_mesh_term(term: str) -> Finding | None:
    """Structured form of one MeSH major term; ``None`` for non-findings ("No Indexing").

    Examples
    --------
    >>> parse_mesh_term("Opacity/lung/base/left/mild")
    Finding(name='opacity', side='left', zone='base', severity=0.35, ...)
    """
    parts = [p.strip() for p in term.split("/") if p.strip()]
    if not parts:
        raise ValueError(f"term must be a non-empty MeSH path, got {term!r}")
    heading = parts[0].lower()
    if heading in _NOT_FINDINGS:
        return None
    quals = tuple(p.lower() for p in parts[1:])
    name = _normalise_heading(parts[0])
    if heading == "lung":
        name = next((_LUNG_QUALIFIERS[q] for q in quals if q in _LUNG_QUALIFIERS), "lung abnormality")
    elif heading == "diaphragm":
        name = next((_DIAPHRAGM_QUALIFIERS[q] for q in quals if q in _DIAPHRAGM_QUALIFIERS), "diaphragm abnormality")
    elif heading == "markings":
        name = next((_MARKINGS_QUALIFIERS[q] for q in quals if q in _MARKINGS_QUALIFIERS), "prominent markings")
    elif heading == "pleura":
        name = "blunted costophrenic angle" if "blunted" in quals else "pleural thickening"
    elif heading == "heart":
        name = "obscured heart border" if "obscured" in quals else "heart abnormality"
    elif heading == "calcinosis" and any(q.startswith("aorta") for q in quals):
        name = "aortic atherosclerosis"
    elif heading in ("aorta", "aorta, thoracic") and not any(q == "tortuous" for q in quals):
        name = "aortic abnormality"
    side = next((q for q in quals if q in SIDES), "")
    zone = next((q for q in quals if q in ZONES), "")
    sev = [SEVERITY[q] for q in quals if q in SEVERITY]
    severity = max(sev) if sev else DEFAULT_SEVERITY
    return Finding(name=name, side=side, zone=zone, severity=severity, qualifiers=quals, term=term)


def parse_mesh_terms(terms: tuple[str, ...] | list[str]) -> list[Finding]:
    """Findings of a report's MeSH major terms, in term order, non-findings dropped."""
    out = []
    for t in terms:
        f = parse_mesh_term(t)
        if f is not None:
            out.append(f)
    return out


def normalised_labels(terms: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Sorted unique normalised finding names of a report's MeSH major terms."""
    return tuple(sorted({f.name for f in parse_mesh_terms(terms)}))


def finding_sides(terms: tuple[str, ...] | list[str]) -> dict[str, frozenset[str]]:
    """Normalised finding name -> the sides its MeSH terms state: ``bilateral`` gives
    ``{"left", "right"}``, a term with no side adds none (the human-label twin of
    :func:`medseek.text.concepts.finding_sides`)."""
    out: dict[str, set[str]] = {}
    for f in parse_mesh_terms(terms):
        sides = out.setdefault(f.name, set())
        if f.side == "bilateral":
            sides.update(("left", "right"))
        elif f.side:
            sides.add(f.side)
    return {name: frozenset(sides) for name, sides in out.items()}
