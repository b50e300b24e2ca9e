"""Report understanding: sections, sentences, findings with negation, concept vectors.

- :mod:`.sections`: headed free text -> canonical sections; sentence splitting.
- :mod:`.lexicon`: the finding lexicon (canonical names, MeSH headings, wordings),
  location / laterality / severity terms and NegEx-style triggers.
- :mod:`.evidence`: :func:`extract_evidence` and :func:`concept_vector`.
- :mod:`.evaluate`: agreement with human MeSH labels (:func:`evaluate_against_mesh`).
"""

from .evaluate import evaluate_against_mesh
from .evidence import Evidence, concept_vector, extract_evidence
from .lexicon import FINDINGS, FINDINGS_BY_NAME, TOP14, Finding
from .sections import sentence_spans, split_sections, split_sentences

__all__ = [
    "FINDINGS",
    "FINDINGS_BY_NAME",
    "TOP14",
    "Evidence",
    "Finding",
    "concept_vector",
    "evaluate_against_mesh",
    "extract_evidence",
    "sentence_spans",
    "split_sections",
    "split_sentences",
]
