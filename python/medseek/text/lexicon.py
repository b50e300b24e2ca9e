"""A chest-radiograph finding lexicon, written from radiology knowledge.

Each :class:`Finding` has a canonical name, the MeSH heading(s) that human indexers of
chest X-ray reports (the OpenI / IU convention: ``heading/qualifier/...``) use for it,
and regular expressions for its usual wordings. Patterns are matched on lower-cased
text with word boundaries added around them; they describe how radiologists write
(inflections, common synonyms, word order), not phrases copied from any corpus.

Besides findings the module lists location, laterality and severity terms, and the
NegEx-style trigger phrases used by :mod:`medseek.text.evidence`.

Which findings are there and why
--------------------------------
``FINDINGS[:14]`` are the 14 most frequent finding headings of the IU reports' human
MeSH labels (first path component). Excluded from that count, and why:

- ``normal`` (no finding), ``No Indexing`` and ``Technical Quality of Image
  Unsatisfactory`` (statements about the study, not the patient);
- anatomy headings whose finding lives in the qualifier: ``Lung`` (``/hypoinflation``,
  ``/hyperdistention``), ``Thoracic Vertebrae`` and ``Spine`` (``/degenerative``),
  ``Aorta`` (``/tortuous``), ``Markings`` (``/bronchovascular``), ``Diaphragm``
  (``/elevated``). These findings are still in the lexicon, after the 14, with the
  full path as their MeSH entry, so the concept space covers them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True)
class Finding:
    """One finding concept.

    Attributes
    ----------
    name : str
        Canonical name, lower case (``"pleural effusion"``).
    mesh : tuple of str
        MeSH heading paths it corresponds to; the first path component is the heading
        (``"Lung/hypoinflation"`` -> heading ``Lung`` with qualifier ``hypoinflation``).
    patterns : tuple of str
        Regular expressions (lower case, no anchors) for its wordings.
    subsumes : tuple of str
        Names of findings whose matches lying inside a match of this one are dropped
        (``"calcified granuloma"`` subsumes ``"calcinosis"``).
    explains : tuple of str
        Names of findings that a non-negated mention of this one accounts for anywhere
        in the same sentence: "the aorta is calcified, compatible with atherosclerosis"
        reports atherosclerosis, not a separate calcinosis.
    """

    name: str
    mesh: tuple[str, ...]
    patterns: tuple[str, ...]
    subsumes: tuple[str, ...] = field(default=())
    explains: tuple[str, ...] = field(default=())

    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(r"\b(?:" + "|".join(self.patterns) + r")\b")

    @property
    def headings(self) -> tuple[str, ...]:
        return tuple(m.split("/")[0] for m in self.mesh)


_S = r"(?:s|es)?"  # optional plural
_CALC = r"calcifi(?:ed|cations?)|calcific"
_W = r"(?:[\w-]+,?\s+){0,3}"  # up to three intervening words (adjectives, locations)

FINDINGS: tuple[Finding, ...] = (
    # ---- the 14 most frequent IU MeSH finding headings, in order of frequency ----
    Finding("opacity", ("Opacity",), (
        r"opacit(?:y|ies)", r"opacifi(?:cation|ed)", r"hazy", r"haziness",
    )),
    Finding("cardiomegaly", ("Cardiomegaly",), (
        r"cardiomegaly",
        # (not "cardiac silhouette ... enlarged": see "enlarged cardiac silhouette")
        r"(?:heart|cardiac)(?!\s+(?:silhouette|contour|shadow))(?:\s+size)?\s+"
        r"(?:is\s+|are\s+|remains?\s+|appears?\s+)?(?:\w+\s+){0,2}(?:enlarged|large)",
        r"enlarge(?:d|ment\s+of\s+the)\s+(?:\w+\s+)?heart", r"cardiac\s+enlargement",
        # borderline cardiomegaly is indexed as cardiomegaly (qualifier "borderline")
        r"borderline\s+(?:\w+\s+)?(?:heart\s+size|cardiomegaly)",
        r"heart\s+(?:size\s+)?(?:is\s+)?borderline",
    )),
    Finding("atelectasis", ("Pulmonary Atelectasis",), (
        r"atelecta(?:sis|ses|tic)",
        # collapse of a lung or lobe is complete atelectasis
        r"(?:lob(?:e|ar)|lung|segmental)\s+collapse", r"collapsed?\s+(?:\w+\s+){0,2}(?:lobe|lung)",
        r"collapse\s+of\s+the\s+(?:\w+\s+){0,2}(?:lobe|lung)",
    )),
    Finding("calcinosis", ("Calcinosis",), (
        _CALC,
    )),
    Finding("calcified granuloma", ("Calcified Granuloma",), (
        rf"(?:{_CALC})\s+{_W}granulom(?:a|as|ata)",
        r"granulom(?:a|as|ata)\s+(?:which\s+|that\s+)?(?:is\s+|are\s+|appears?\s+)?"
        r"(?:\w+\s+)?calcified",
        r"granulomatous\s+calcifications?",
    ), subsumes=("calcinosis", "granuloma", "granulomatous disease")),
    Finding("cicatrix", ("Cicatrix",), (
        r"scar" + _S, r"scarring", r"cicatri(?:x|ces|cial)",
    )),
    Finding("pleural effusion", ("Pleural Effusion",), (
        r"effusion" + _S, r"pleural\s+fluid", r"hydrothorax",
    )),
    Finding("atherosclerosis", ("Atherosclerosis",), (
        r"atherosclero(?:sis|tic)", r"atheromatous", r"arteriosclero(?:sis|tic)",
    ), explains=("calcinosis",)),
    Finding("airspace disease", ("Airspace Disease",), (
        r"air\s*-?\s*space\s+(?:\w+\s+)?disease" + _S,
    )),
    Finding("indwelling catheter", ("Catheters, Indwelling",), (
        r"catheter" + _S, r"picc" + _S, r"(?:central|venous|subclavian|jugular|dialysis)\s+"
        r"(?:venous\s+)?(?:line|port)" + _S, r"port-?a-?cath" + _S,
        r"(?:power\s*)?port\s+(?:catheter|device|tip)", r"swan[-\s]ganz",
        # a tube tip in a central vein can only be a venous catheter
        r"tip\s+(?:\w+\s+){0,4}(?:svc|superior\s+vena\s+cava|cavo-?\s*atrial|caval[-\s]+atrial|"
        r"brachiocephalic)",
        r"(?:in|within|at|over)\s+the\s+(?:\w+\s+)?(?:svc|superior\s+vena\s+cava)",
    )),
    Finding("density", ("Density",), (
        r"densit(?:y|ies)", r"(?:hyper|radio)-?dens(?:e|ity|ities)",
    )),
    Finding("deformity", ("Deformity",), (
        r"deformit(?:y|ies)", r"deformed", r"wedg(?:e|ed|ing)",
        r"(?:contour|cortical)\s+irregularit(?:y|ies)",
    )),
    Finding("granulomatous disease", ("Granulomatous Disease",), (
        r"granulomatous", r"granulomatous\s+(?:disease|infection|process|change" + _S + ")",
        rf"(?:{_CALC})\s+granulomatous", r"granulomatous\s+(?:\w+\s+)?calcifications?",
    ), subsumes=("calcinosis",)),
    Finding("nodule", ("Nodule",), (
        # the noun; "nodular opacity" is indexed as a (round) opacity, not as a nodule
        r"nodules?", r"(?:fibro|reticulo|micro)-?nodul(?:ar|e|es)",
    )),
    # ---- further findings of the concept space (not part of the top-14 evaluation) ----
    # an enlarged silhouette is not necessarily a large heart (pericardial fluid, technique)
    Finding("enlarged cardiac silhouette", ("Cardiac Shadow/enlarged",), (
        r"(?:cardiac|cardiomediastinal|heart)\s+(?:silhouette|contour|shadow)s?\s+(?:is\s+|are\s+|"
        r"remains?\s+|appears?\s+)?(?:\w+\s+){0,2}enlarged",
        r"enlarge(?:d|ment\s+of\s+the)\s+(?:\w+\s+)?(?:cardiac|cardiomediastinal|heart)\s+"
        r"(?:silhouette|contour|shadow)",
    )),
    # "granuloma" without "calcified" is indexed under its own heading
    Finding("granuloma", ("Granuloma",), (r"granulom(?:a|as|ata)",)),
    Finding("implanted device", ("Implanted Medical Device",), (
        r"pacemaker" + _S, r"pacer" + _S, r"defibrillator" + _S, r"aicd" + _S,
        r"(?:cardiac\s+)?(?:pacing|pacer|pacemaker)\s+leads?",
    )),
    Finding("surgical material", ("Surgical Instruments",), (
        r"(?:surgical\s+|vascular\s+)?clips?", r"sternotomy\s+wires?", r"staples?",
        r"suture\s+material",
    )),
    Finding("post sternotomy", ("Sternotomy",), (
        r"(?:median\s+)?sternotomy", r"cabg", r"coronary\s+artery\s+bypass",
    )),
    Finding("pericardial effusion", ("Pericardial Effusion",), (
        r"pericardial\s+(?:effusion|fluid)" + _S,
    ), subsumes=("pleural effusion",)),
    Finding("scoliosis", ("Scoliosis",), (r"scolio(?:sis|tic)", r"levoscoliosis", r"dextroscoliosis")),
    Finding("kyphosis", ("Kyphosis",), (r"kypho(?:sis|tic)",)),
    Finding("fracture", ("Fractures, Bone",), (r"fractur(?:e|es|ed)", r"fx")),
    Finding("pulmonary congestion", ("Pulmonary Congestion",), (
        r"(?:vascular|venous|pulmonary)\s+congestion", r"congestion", r"cephalization",
        r"congestive",
    )),
    Finding("pulmonary edema", ("Pulmonary Edema",), (r"o?edema",)),
    Finding("emphysema", ("Emphysema", "Pulmonary Emphysema"), (r"emphysema(?:tous)?",)),
    Finding("copd", ("Pulmonary Disease, Chronic Obstructive",), (
        r"copd", r"chronic\s+obstructive\s+(?:pulmonary|lung)\s+disease",
    )),
    Finding("hyperinflation", ("Lung/hyperdistention",), (
        r"hyperinflat(?:ion|ed)", r"hyperexpan(?:sion|ded)", r"hyperaerat(?:ion|ed)",
        r"overinflat(?:ion|ed)", r"hyperlucen(?:t|cy)",
    )),
    Finding("hypoinflation", ("Lung/hypoinflation",), (
        r"hypoinflat(?:ion|ed)", r"low\s+lung\s+volumes?", r"lung\s+volumes?\s+(?:are\s+|is\s+)?"
        r"(?:\w+\s+)?(?:low|decreased|diminished|reduced)", r"poor(?:ly)?\s+inspir\w*",
        r"shallow\s+inspiration",
    )),
    Finding("spine degeneration", ("Thoracic Vertebrae/degenerative", "Spine/degenerative"), (
        r"degenerative\s+(?:\w+\s+){0,3}(?:spine|spinal|vertebra\w*|dis[ck]\w*|endplate\w*)",
        r"(?:spondylosis|spondylitic|osteophyt\w+|dis[ck]\s+space\s+narrowing)",
        r"degenerative\s+changes?\s+(?:of|in|within|throughout)\s+the\s+(?:\w+\s+)?spine",
    )),
    Finding("tortuous aorta", ("Aorta/tortuous",), (
        r"tortuous(?:ity)?", r"tortuosity", r"ectatic\s+aort\w*",
        r"unfold(?:ed|ing)\s+(?:of\s+the\s+)?aort\w*",
    )),
    Finding("elevated hemidiaphragm", ("Diaphragm/elevated",), (
        r"elevat(?:ed|ion\s+of\s+the)\s+(?:\w+\s+)?(?:hemi-?\s*)?diaphragm\w*",
        r"(?:hemi-?\s*)?diaphragm\w*\s+(?:is\s+|are\s+|remains\s+)?(?:\w+\s+)?elevated",
        r"eventration",
    )),
    Finding("flattened diaphragm", ("Diaphragm/flattened",), (
        r"flatten(?:ed|ing)\s+(?:of\s+the\s+)?(?:\w+\s+)?(?:hemi-?\s*)?diaphragm\w*",
        r"diaphragm\w*\s+(?:are\s+|is\s+)?(?:\w+\s+)?flat(?:tened)?",
    )),
    Finding("costophrenic blunting", ("Costophrenic Angle/blunted",), (
        r"blunt(?:ed|ing)",
    )),
    Finding("interstitial markings", ("Markings",), (
        r"(?:interstitial|bronchovascular|reticular|vascular)\s+(?:\w+\s+)?markings?",
        r"markings", r"interstitial\s+(?:prominence|changes?|pattern|thickening|opacit\w+|disease)",
    )),
    Finding("consolidation", ("Consolidation",), (r"consolidat(?:ion|ions|ed|ive)",)),
    Finding("infiltrate", ("Infiltrate",), (r"infiltrat(?:e|es|ion|ive)",)),
    Finding("pneumonia", ("Pneumonia",), (r"pneumonia" + _S, r"pneumonitis")),
    Finding("pneumothorax", ("Pneumothorax",), (r"pneumothora(?:x|ces)",)),
    Finding("hiatal hernia", ("Hernia, Hiatal",), (r"hiatal\s+hernia" + _S, r"hiatus\s+hernia" + _S)),
    Finding("mass", ("Mass",), (r"mass(?:es)?",)),
    Finding("pleural thickening", ("Thickening",), (r"pleural\s+thickening", r"thickening")),
    Finding("lymphadenopathy", ("Lymph Nodes/enlarged",), (
        r"lymphadenopathy", r"adenopathy", r"(?:hilar|mediastinal)\s+(?:\w+\s+)?enlargement",
    )),
    Finding("fibrosis", ("Pulmonary Fibrosis", "Fibrosis"), (r"fibros(?:is|es)", r"fibrotic")),
    Finding("costal cartilage calcification", ("Costal Cartilage/calcified",), (
        # an ageing change, not indexed as calcinosis
        rf"(?:{_CALC})\s+(?:\w+\s+)?(?:costochondral|costal)\s+cartilages?",
        rf"(?:costochondral|costal)\s+(?:cartilage\s+)?(?:{_CALC})",
    ), subsumes=("calcinosis",)),
    Finding("tube", ("Tube, Inserted",), (
        r"(?:endotracheal|et|nasogastric|ng|enteric|feeding|chest|thoracostomy)\s+tubes?",
    )),
)

FINDINGS_BY_NAME: dict[str, Finding] = {f.name: f for f in FINDINGS}
TOP14: tuple[str, ...] = tuple(f.name for f in FINDINGS[:14])
assert len(TOP14) == 14 and "granuloma" not in TOP14

# ---- attributes: canonical value -> patterns, longest tried first by the extractor ----
LOCATIONS: dict[str, tuple[str, ...]] = {
    "upper lobe": (r"upper\s+lobes?", r"[rl]ul"),
    "middle lobe": (r"middle\s+lobe", r"rml"),
    "lower lobe": (r"lower\s+lobes?", r"[rl]ll"),
    "lingula": (r"lingula[r]?",),
    "upper zone": (r"upper\s+(?:lung\s+)?(?:zones?|fields?)",),
    "mid zone": (r"mid(?:dle)?\s*-?\s*(?:lung\s+)?(?:zones?|fields?)", r"midlung"),
    "lower zone": (r"lower\s+(?:lung\s+)?(?:zones?|fields?)",),
    "base": (r"bases?", r"basilar", r"basal", r"bibasilar", r"bibasal", r"infrahilar"),
    "apex": (r"apex", r"apices", r"apical", r"biapical"),
    "hilum": (r"hil(?:um|a|ar)", r"perihilar", r"parahilar"),
    "costophrenic angle": (r"costophrenic(?:\s+angles?|\s+sulc(?:us|i))?",),
    "mediastinum": (r"mediastin(?:um|al)", r"paratracheal", r"aortopulmonary", r"subcarinal"),
    "retrocardiac": (r"retrocardiac",),
    "aorta": (r"aort(?:a|ic)(?:\s+(?:arch|knob))?",),
    "heart": (r"heart", r"cardiac", r"pericardial"),
    "pleura": (r"pleura[l]?", r"fissur(?:e|es|al)"),
    "diaphragm": (r"(?:hemi)?-?\s*diaphragm\w*", r"subdiaphragmatic"),
    "thoracic spine": (
        r"thoracic\s+(?:spine|vertebra[e]?|vertebral\s+bod(?:y|ies))", r"t\d{1,2}(?:-t?\d{1,2})?",
    ),
    "lumbar spine": (r"lumbar\s+(?:spine|vertebra[e]?)", r"l[1-5](?:-l?[1-5])?"),
    "spine": (r"spine", r"spinal", r"vertebra[el]?", r"vertebral\s+bod(?:y|ies)", r"endplates?"),
    "rib": (r"ribs?", r"costal"),
    "clavicle": (r"clavic(?:le|les|ular)",),
    "shoulder": (r"shoulders?", r"humer(?:us|al)", r"glenohumeral", r"acromioclavicular"),
    "upper abdomen": (r"(?:upper\s+)?abdom(?:en|inal)", r"right\s+upper\s+quadrant", r"gallbladder"),
    "chest wall": (r"chest\s+wall", r"soft\s+tissues?", r"axill(?:a|ae|ary)", r"breasts?"),
    "lung": (r"lungs?", r"pulmonary", r"parenchym(?:a|al)"),
}

# locations too broad to be preferred over a more specific one in the same clause
GENERIC_LOCATIONS = frozenset({"lung", "heart"})

LATERALITY: dict[str, tuple[str, ...]] = {
    "bilateral": (r"bilateral(?:ly)?", r"both", r"bibasilar", r"bibasal", r"biapical",
                  r"bilat", r"right\s+and\s+left", r"left\s+and\s+right"),
    "left": (r"left", r"lt", r"lingula[r]?", r"l[ul]l"),
    "right": (r"right", r"rt", r"r[uml]l"),
}

SEVERITY: dict[str, tuple[str, ...]] = {
    "minimal": (r"minimal(?:ly)?", r"trace", r"tiny", r"subtle", r"slight(?:ly)?", r"faint"),
    "mild": (r"mild(?:ly)?", r"small", r"borderline", r"minor"),
    "moderate": (r"moderate(?:ly)?", r"moderate-sized", r"medium"),
    "severe": (r"severe(?:ly)?", r"large", r"marked(?:ly)?", r"extensive", r"massive",
               r"significant(?:ly)?", r"prominent", r"dense"),
}

# ---- NegEx-style triggers (lower case regular expressions) ----
NEGATION_PRE: tuple[str, ...] = (
    r"no", r"not", r"without", r"negative\s+for", r"free\s+of", r"absence\s+of",
    r"absent", r"no\s+(?:evidence|signs?|findings?)\s+(?:of|to\s+suggest)", r"resolution\s+of",
    r"resolved", r"clear(?:ed)?\s+of", r"rather\s+than", r"nor", r"neither", r"never",
    r"removal\s+of", r"interval\s+removal\s+of", r"ruled?\s+out", r"denies",
)
NEGATION_POST: tuple[str, ...] = (
    r"(?:has|have)\s+(?:\w+\s+)?resolved", r"resolved", r"(?:is|are|was|were)\s+(?:\w+\s+)?"
    r"(?:not\s+(?:seen|identified|visualized|present|appreciated|demonstrated)|absent|gone)",
    r"(?:has|have)\s+been\s+removed", r"removed", r"no\s+longer\s+(?:seen|visualized|present|evident)",
    r"(?:is|are|was|were)\s+(?:now\s+)?(?:ruled|excluded)\s+out", r"(?:is|are)\s+excluded",
)
UNCERTAINTY_PRE: tuple[str, ...] = (
    r"may\s+(?:also\s+)?(?:represent|reflect|be|indicate|relate\s+to)", r"might\s+(?:represent|be)",
    r"could\s+(?:represent|reflect|be|indicate)", r"possible", r"possibly", r"probable",
    r"probably", r"likely", r"questionable", r"question(?:\s+of)?", r"suspicion\s+(?:for|of)",
    r"cannot\s+(?:be\s+)?(?:exclude|rule\s+out)",
    r"can\s*not\s+(?:exclude|rule\s+out)", r"suspicious\s+for",
    # hypothetical: the finding is what the reader is asked to look for
    r"(?:to\s+)?(?:exclude|rule\s+out|r/o|evaluate\s+for|assess\s+for)", r"could\s+obscure",
    r"evaluation\s+for",
    r"(?:to\s+)?identify", r"if", r"suspect(?:ed)?", r"concern(?:ing)?\s+for",
    r"suggest(?:s|ive\s+of|ing)?", r"differential\s+(?:diagnosis\s+)?includes?",
    r"versus", r"vs\.?", r"equivocal", r"indeterminate", r"presumed", r"presumably",
    # ("compatible with" / "consistent with" state a conclusion, so they are not here)
    r"favor(?:ed)?", r"\?", r"doubtful", r"uncertain", r"either",
)
UNCERTAINTY_POST: tuple[str, ...] = (
    r"(?:can\s*not|could\s+not)\s+be\s+(?:entirely\s+|completely\s+)?(?:excluded|ruled\s+out)",
    r"(?:is\s+|are\s+)?not\s+(?:entirely\s+|completely\s+)?(?:excluded|ruled\s+out)",
    r"(?:is|are)\s+(?:possible|suspected|questioned|likely|not\s+certain)", r"suspected", r"\?",
    r"versus", r"vs\.?",  # both alternatives are uncertain
)
# phrases that look like triggers but are not (NegEx "pseudo-triggers")
PSEUDO_TRIGGERS: tuple[str, ...] = (
    r"no\s+(?:significant\s+|interval\s+|definite\s+)?(?:change|increase|decrease|enlargement\s+of)",
    r"not\s+(?:only|necessarily|changed|significantly\s+changed)",
    r"without\s+(?:significant\s+)?change",
    r"no\s+new", r"not\s+(?:well\s+)?seen\s+on\s+the\s+(?:lateral|frontal|pa)",
    r"gram\s+negative", r"no\s+longer\s+(?:enlarged|visualized\s+on)",
    r"age[-\s]+indeterminate",
)
# a trigger's scope ends at these words (and at the end of the sentence)
SCOPE_TERMINATORS: tuple[str, ...] = (
    r"but", r"however", r"although", r"though", r"except", r"aside\s+from", r"apart\s+from",
    r"other\s+than", r"with\s+the\s+exception", r"which", r"whereas", r"while", r"yet",
    r"there\s+(?:is|are)", r"now", r"still", r"persistent", r"residual", r"stable", r"again",
    r"unchanged", r";",
    # a verb closing a negated statement: "no effusion seen, left hilar calcification"
    # (only before a comma: "no visualized pneumothorax" keeps its scope)
    r"(?:seen|noted|identified|visualized|demonstrated)(?=\s*,)",
)

# Statements that deny findings without naming them: "the lungs are clear" says there is
# no opacity, consolidation, edema or effusion; "heart size is normal" denies cardiomegaly.
IMPLIED_NEGATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"lungs?\s+(?:are\s+|is\s+|appear\s+|remain\s+)?(?:otherwise\s+|now\s+|grossly\s+)?clear"
     r"|clear\s+lungs?",
     ("opacity", "airspace disease", "consolidation", "infiltrate", "pulmonary edema",
      "pneumonia", "density")),
    (r"(?:heart|cardiac)\s+(?:size\s+)?(?:is\s+)?(?:within\s+)?normal(?:\s+limits)?"
     r"|normal\s+(?:heart|cardiac)\s+size|(?:heart|cardiac)\s+size\s+(?:is\s+)?(?:within\s+normal"
     r"|unremarkable|stable)|normal[-\s]sized\s+heart|cardiomediastinal\s+silhouette\s+(?:is\s+)?"
     r"(?:within\s+)?normal|normal\s+cardiomediastinal",
     ("cardiomegaly",)),
    (r"no\s+acute\s+(?:cardiopulmonary|pulmonary|intrathoracic)\s+"
     r"(?:disease|abnormalit\w+|process|findings?)",
     ("airspace disease", "consolidation", "pleural effusion", "pneumothorax", "pulmonary edema")),
    (r"costophrenic\s+angles?\s+(?:are\s+|is\s+)?(?:sharp|clear)",
     ("pleural effusion", "costophrenic blunting")),
)
