"""The query pipeline: ANN top-K', region rerank, diversification, explanations.

Pure stages over embeddings and metadata (encoder-agnostic: any L2-normalised vectors):

- ``region_rerank`` / ``organ_embedding`` (rerank.py): WristMIR's region-conditioned
  second stage; a volume's organ embedding from its chunks.
- ``diversify`` (diversify.py): greedy MMR with provenance caps and near-duplicate removal.
- ``explain`` / ``concept_scores`` (explain.py): concepts shared by query and hit (CEMRAG).
- ``diagnose`` (diagnose.py): label probabilities voted by the nearest cases.

``SearchPipeline`` (pipeline.py) ties them to a ``Catalog`` and its ``Store``, configured by
``SearchConfig`` (query.py) and asked per call by ``QueryOptions`` (query.py; a whole
request before embedding is a ``SearchQuery``); its stages hand each other the records of
stages.py. It reads the store through ``Store.reader()`` (``medseek.index.reader``): no SQL
lives here.
"""

from .diagnose import diagnose
from .diversify import DEFAULT_CAPS, Diversified, Skip, diversify
from .explain import ConceptBank, ConceptMatch, concept_scores, explain
from medseek.index.reader import Candidates, ChildRow, StoreReader

from .pipeline import Hit, SearchPipeline, SearchResult
from .query import (MAX_K, PROVENANCE_FIELDS, QUERY_KINDS, Box, InvalidQuery, QueryOptions,
                    RegionQuery, RegionSpec, SearchConfig, SearchFilters, SearchQuery)
from .rerank import mix_region_scores, organ_embedding, region_rerank, region_similarity

__all__ = [
    "DEFAULT_CAPS", "MAX_K", "PROVENANCE_FIELDS", "QUERY_KINDS", "Box", "Candidates", "ChildRow",
    "ConceptBank", "ConceptMatch", "Diversified", "Hit", "InvalidQuery", "QueryOptions",
    "RegionQuery", "RegionSpec", "SearchConfig", "SearchFilters", "SearchPipeline",
    "SearchQuery", "SearchResult", "Skip",
    "StoreReader", "concept_scores", "diagnose", "diversify", "explain", "mix_region_scores",
    "organ_embedding", "region_rerank", "region_similarity",
]
