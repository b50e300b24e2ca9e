"""``Draft``: a grounded report draft for an image (CEMRAG), on the query service's path.

The query (an uploaded image, or a stored item left out of its own neighbours) is embedded
once; that embedding gives both the plain top-k neighbours (``QueryService``'s micro-batched
ANN) and the image's concept scores (the collection's ``ConceptBank``: the served model's
calibrated finding head). The neighbours' report texts come from the store
(``Store.report_texts``: the ``IngestItem.report`` an item was ingested with; images keep
their own report rather than pointing at a ``report`` collection item, so a draft needs no
join and a deleted image takes its report with it). The draft is composed offline
(``medseek.search.draft``) or, with ``DraftConfig.generator = "llm"``, written by a chat
model from the same context (``medseek.search.draft_prompt``, ``medseek.serve.draft_llm``).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from medseek.search.draft import Draft, RetrievedReport, compose_draft
from medseek.search.draft_prompt import draft_messages, read_grounded_answer

from . import ingest as ing
from .draft_llm import ChatClient, DraftConfig
from .encoding import run_in
from .errors import FailedPrecondition
from .query_service import query_from_request
from .v1 import retrieval_pb2 as pb

__all__ = ["DraftService", "draft_response"]


class DraftService:
    """Answers ``Draft`` requests (module docstring).

    Parameters
    ----------
    config : ServeConfig (its ``draft`` field, a DraftConfig, when it has one)
    encoding, store, pipeline, queries, index_pool : the servicer's parts
    """

    def __init__(self, config, encoding, store, pipeline, queries, index_pool) -> None:
        self.config = getattr(config, "draft", None) or DraftConfig()
        self.encoding, self.store, self.pipeline = encoding, store, pipeline
        self.queries, self.index_pool = queries, index_pool
        self.chat = ChatClient(self.config) if self.config.generator == "llm" else None

    async def draft(self, request) -> pb.DraftResponse:
        t0 = time.perf_counter()
        kind = request.WhichOneof("query")
        if kind is None:
            raise ing.InvalidField("query", "one of image, item_id is required")
        search = pb.SearchRequest(k=request.k or self.config.k, collection=request.collection,
                                  request_id=request.request_id)
        setattr(search, kind, getattr(request, kind))
        if request.HasField("filters"):
            search.filters.CopyFrom(request.filters)
        if kind == "item_id":
            # the item's own study is left out: its other views carry the item's own report,
            # which a draft of it must not copy
            stored = await run_in(self.queries.search_pool, self.store.get, [request.item_id])
            study = stored[request.item_id].record.study_pseudonym if stored else None
            if study:
                search.filters.exclude_studies.append(study)
        query = query_from_request(search)  # checks k and the filters, naming the field
        exclude = None
        if kind == "item_id":
            vec, stored = await run_in(self.queries.search_pool, self.queries.stored_embedding,
                                       request.item_id)
            collection, exclude = request.collection or stored, request.item_id
        else:
            dec = await self.encoding.decode("image", request.image, "image")
            collection = request.collection or ing.DEFAULT_COLLECTION["image"]
            route = self.encoding.route("image", collection, "image")
            vec = await self.encoding.encode(route, "image", dec.payload)
        if collection not in self.store.config.collections:
            raise ing.InvalidField("collection", f"must be one of "
                                   f"{self.store.config.collections}, got {collection!r}")
        bank = self.pipeline.collection_concepts.get(collection, self.pipeline.concepts)
        if bank is None:
            raise FailedPrecondition("this server's encoder has no finding concepts to "
                                     "check a draft against (an image-only model)")
        found = await self.queries.search_embedding(vec, collection, query.options, exclude,
                                                    request.request_id)
        if not found.hits:
            narrowed = " that pass the filters" if request.HasField("filters") else ""
            besides = " besides item_id" if kind == "item_id" else ""
            raise FailedPrecondition(f"collection: {collection!r} holds no items{narrowed}"
                                     f"{besides} to draft from")
        ids = [h.id for h in found.hits]
        texts = await run_in(self.index_pool, self.store.report_texts, ids)
        reports = [RetrievedReport(h.id, h.score, texts[h.id]) for h in found.hits
                   if h.id in texts]
        if not reports:
            raise FailedPrecondition(f"collection: none of the {len(ids)} nearest items of "
                                     f"{collection!r} has a stored report (IngestItem.report)")
        scores = dict(zip(bank.names, bank.scores(np.asarray(vec, dtype=np.float32))))
        t1 = time.perf_counter()
        draft = compose_draft(scores, reports)
        if self.chat is not None:
            answer = await asyncio.to_thread(self.chat.complete,
                                             draft_messages(scores, reports, draft))
            draft = read_grounded_answer(answer, scores, reports, draft.sides)
        resp = draft_response(draft, scores, found.hits, self.config.generator,
                              request.request_id)
        for stage, ms in found.timings_ms.items():
            resp.timings_ms[stage] = ms
        resp.timings_ms["draft"] = (time.perf_counter() - t1) * 1e3
        resp.timings_ms["total"] = (time.perf_counter() - t0) * 1e3
        return resp


def draft_response(draft: Draft, scores: dict, hits, generator: str,
                   request_id: str = "") -> pb.DraftResponse:
    """The ``DraftResponse`` of a draft, the image's concept scores and the neighbours."""
    resp = pb.DraftResponse(text=draft.text, generator=generator, request_id=request_id)
    for s in draft.sentences:
        msg = resp.sentences.add(text=s.text, source_id=s.source_id, kind=s.kind, note=s.note)
        for c in s.support:
            sup = msg.support.add(concept=c.concept, stance=c.stance)
            if c.score is not None:
                sup.score = c.score
    for d in draft.dropped:
        resp.dropped.add(text=d.text, source_id=d.source_id, reason=d.reason)
    for name, score in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])):
        resp.concepts.add(name=name, score=float(score), laterality=draft.sides.get(name, ""))
    resp.neighbours.extend(hits)
    return resp
