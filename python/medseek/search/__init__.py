"""The query pipeline: ANN top-K', region rerank, diversification, explanations.

Pure stages over embeddings and metadata (encoder-agnostic: any L2-normalised vectors):

- ``region_rerank`` / ``organ_embedding`` (rerank.py): WristMIR's region-conditioned
  second stage; a volume's organ embedding from its chunks.
- ``diversify`` (diversify.py): greedy MMR with provenance caps and near-duplicate removal.
- ``explain`` / ``concept_scores`` (explain.py): concepts shared by query and hit (CEMRAG).
- ``diagnose`` (diagnose.py): label probabilities voted by the nearest cases.

``SearchPipeline`` (pipeline.py) ties them to a ``Catalog`` and its ``Store``, configured by
``SearchConfig`` (query.py); ``StoreReader`` (store_reads.py) reads candidates by row key
and children by parent through its own read-only SQLite connection.
"""

from .diagnose import diagnose
from .diversify import DEFAULT_CAPS, Diversified, Skip, diversify
from .explain import ConceptBank, ConceptMatch, concept_scores, explain
from .pipeline import Hit, SearchPipeline, SearchResult
from .query import PROVENANCE_FIELDS, RegionQuery, SearchConfig, SearchFilters
from .rerank import mix_region_scores, organ_embedding, region_rerank, region_similarity
from .store_reads import Candidates, ChildRow, StoreReader

__all__ = [
    "DEFAULT_CAPS", "PROVENANCE_FIELDS", "Candidates", "ChildRow", "ConceptBank", "ConceptMatch",
    "Diversified", "Hit",
    "RegionQuery", "SearchConfig", "SearchFilters", "SearchPipeline", "SearchResult", "Skip",
    "StoreReader", "concept_scores", "diagnose", "diversify", "explain", "mix_region_scores",
    "organ_embedding", "region_rerank", "region_similarity",
]
