"""The write side of the service: Ingest and Delete.

An Ingest call's items are decoded and embedded concurrently (``Encoding``; their encodes
share micro-batches of their lane, and one call holds at most half a lane's queue),
committed ``max_batch`` at a time on the index thread, and each is acknowledged only after
its commit. A volume's chunks and organs are stored as its
children, each with a half-open z-range ``[z0, z1)`` of slices of the volume as uploaded
(``medseek.search.query``); an image's regions as children with a box. In clinical mode
(``ServeConfig.pacs_mode``) the original UIDs of each committed DICOM item are kept apart
from the store, in the re-identification map (``medseek.serve.reident``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from google.protobuf.message import DecodeError

from medseek.search.rerank import organ_embedding

from . import ingest as ing
from . import item_records
from . import regions as rp
from .auto_regions import AutoRegions
from .encoding import LANE_OF, Encoding, run_in
from .errors import NotFound, Undecodable, classify
from .reident import origin_of_upload
from .v1 import retrieval_pb2 as pb


class IngestService:
    """Ingest and Delete over the store and its catalog.

    Parameters
    ----------
    config : ServeConfig
    encoding : Encoding
    store, catalog : Store, Catalog (opened)
    metrics : ServerMetrics
    index_pool : ThreadPoolExecutor
        The index thread: store writes and catalog syncs run there, one at a time.
    unavailable : tuple of exception types
        Errors of the encoder that mean its backend is down (-> UNAVAILABLE).
    reident : ReidentMap, optional
        Clinical mode: where the original UIDs of committed DICOM items are kept.
    """

    def __init__(self, config, encoding: Encoding, store, catalog, metrics,
                 index_pool: ThreadPoolExecutor, unavailable: tuple = (),
                 reident=None) -> None:
        self.config, self.encoding, self.store, self.catalog = config, encoding, store, catalog
        self.reident = reident
        self.metrics, self.index_pool, self.unavailable = metrics, index_pool, unavailable
        self.reader = store.reader()  # children of updated items (on the index thread)
        self.auto_regions = AutoRegions() if getattr(config, "auto_regions", False) else None
        # items of one Ingest call in flight at once: a batch, and of each encode lane's
        # items at most half its queue
        b = config.encode_batch
        self.ingest_batch = max(1, min(b.max_batch, b.max_queue // 2))
        self.lane_batch = {name: max(1, min(b.max_batch, lane.max_queue // 2))
                           for name, lane in encoding.lanes.items()}
        self.update_index_gauges()

    def close(self) -> None:
        self.reader.close()

    def update_index_gauges(self) -> None:
        for name in self.store.collections():
            try:
                self.metrics.index_size.labels(name).set(len(self.catalog.index(name)))
            except ValueError:
                pass

    async def ingest(self, request_iterator) -> pb.IngestResponse:
        """Items are decoded and encoded concurrently (their encodes share micro-batches),
        committed ``max_batch`` at a time, and acknowledged only after each commit.

        Every item gets an ack, in stream order: committed, or failed with its own error
        (bad content, a message that does not parse, an encoder or store failure); a
        failed item fails nothing else, so nothing committed goes without its ack."""
        resp, pending, n = pb.IngestResponse(), [], 0
        in_lane: dict = {}  # pending items per encode lane
        try:
            try:
                async for item in request_iterator:
                    if isinstance(item, Undecodable):
                        pending.append((n, "", _failed(item.error(f"items[{n}]"))))
                    else:
                        if item.id and any(i == item.id for _, i, _ in pending):
                            await self._flush(pending, resp)  # a repeat: commit the first one
                            in_lane.clear()
                        task = asyncio.ensure_future(self._prepare(item, n))
                        pending.append((n, item.id, task))
                        lane = LANE_OF.get(item.WhichOneof("content"))
                        if lane is not None:
                            in_lane[lane] = in_lane.get(lane, 0) + 1
                    n += 1
                    if len(pending) >= self.ingest_batch or any(
                            c >= self.lane_batch[k] for k, c in in_lane.items()):
                        await self._flush(pending, resp)
                        in_lane.clear()
            except DecodeError:  # a stream read without the lenient deserializer ends here
                pending.append((n, "", _failed(ing.InvalidField(
                    f"items[{n}]", "does not parse as medseek.v1.IngestItem; the items after "
                                   "it were not read"))))
            await self._flush(pending, resp)
        finally:
            for _, _, task in pending:  # a cancellation: drop the rest
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved, so asyncio does not log it
                task.cancel()
        return resp

    async def _prepare(self, item, i: int):
        """Decode and encode one item: (record, embedding, [(child record, embedding)],
        origin), the origin (original UIDs) read in clinical mode only, else None."""
        prepared = await self._prepare_content(item, i)
        kind = item.WhichOneof("content")
        origin = None
        if self.reident is not None and kind in ("image", "volume"):
            origin = await asyncio.to_thread(origin_of_upload, getattr(item, kind),
                                             f"items[{i}].{kind}", self.config.limits)
        return (*prepared, origin)

    async def _prepare_content(self, item, i: int):
        """Decode and encode one item: (record, embedding, [(child record, embedding)])."""
        kind = item.WhichOneof("content")
        ing.check_item_id(item.id, f"items[{i}].id")  # printable, bounded, not reserved
        if kind is None:
            raise ing.InvalidField(f"items[{i}].content", "one of text, image, volume is required")
        if item.report.strip():  # the report kept for Draft: bounded as query text is
            ing.decode_text(item.report, f"items[{i}].report", self.config.budget)
        field = f"items[{i}].{kind}"
        dec = await self.encoding.decode(kind, getattr(item, kind), field)
        collection = item.collection or ing.DEFAULT_COLLECTION[kind]
        route = self.encoding.route(kind, collection, field)
        record = item_records.build_record(item, collection, dec, f"items[{i}]")
        names = [r.name for r in item.regions]
        for j, name in enumerate(names):
            if name in names[:j]:
                raise ing.InvalidField(f"items[{i}].regions[{j}].name", f"repeats {name!r}")
        if kind == "volume":
            return await self._prepare_volume(item, i, dec, record)
        children, inputs = [], []  # inputs: model-input boxes, or crops (serve.regions)
        head = self.encoding.region_pathway == rp.REGION_HEAD
        regions, automatic = await self._auto_regions(item, kind, dec, record)
        for j, region in enumerate(regions):
            rfield = f"items[{i}].regions[{j}]"
            if kind != "image":
                raise ing.InvalidField(rfield, "regions need an image or a volume item")
            if not region.name or not region.HasField("box") or region.HasField("z_range"):
                raise ing.InvalidField(rfield, "an image's regions need a name and a box "
                                               "(a z_range is for a volume's organs)")
            self.encoding.check_pathway(f"items[{i}].regions")
            children.append(item_records.region_record(
                record, region, self.config.search.region_collection, rfield,
                automatic=automatic))
            if head:
                inputs.append(ing.model_box(dec.pixels.shape, region.box, f"{rfield}.box",
                                            self.config.preprocess))
            else:
                inputs.append(ing.crop(dec.pixels, region.box, f"{rfield}.box",
                                       self.config.preprocess))
        if head and children:  # the image and its regions in one pass of the region graph
            emb, embs = await self.encoding.encode("image_regions", field, (dec.payload, np.stack(inputs)))
            return record, emb, list(zip(children, embs))
        embs = await asyncio.gather(self.encoding.encode(route, field, dec.payload),
                                    *(self.encoding.encode("image", f"items[{i}].regions[{j}]", c)
                                      for j, c in enumerate(inputs)))
        return record, embs[0], list(zip(children, embs[1:]))

    async def _auto_regions(self, item, kind: str, dec: ing.Decoded, record) -> tuple[list, bool]:
        """The item's regions, or with ``auto_regions`` on, for an image sent without any,
        the localiser's (``medseek.serve.auto_regions``); True when they are the latter."""
        if self.auto_regions is None or kind != "image" or item.regions:
            return list(item.regions), False
        found = await asyncio.to_thread(self.auto_regions.regions_of, dec.pixels,
                                        record.body_part, record.view)
        return found, bool(found)

    async def _prepare_volume(self, item, i: int, dec: ing.Decoded, record):
        """A volume with its chunks and organs as children: each chunk's embedding, and for
        each organ the overlap-weighted mean of the chunks covering its z-range (what the
        pipeline's region rerank pools for a volume)."""
        field, search = f"items[{i}].volume", self.config.search
        organs = [item_records.organ_record(record, region, search.region_collection,
                                            f"items[{i}].regions[{j}]", dec.source_depth)
                  for j, region in enumerate(item.regions)]
        if not self.encoding.chunked:
            if organs:
                raise ing.InvalidField(f"items[{i}].regions", "organ regions need chunk "
                                       "embeddings, which this server's encoder does not give")
            return record, await self.encoding.encode("volume", field, dec.payload), []
        enc, z = await self.encoding.encode_chunked(dec, field)
        children = [(item_records.chunk_record(record, n, zr, search.chunk_collection, field), emb)
                    for n, (zr, emb) in enumerate(zip(z, enc.chunks))]
        for j, organ in enumerate(organs):
            vec = organ_embedding(enc.chunks, z, organ.z_range)
            if vec is None:
                raise ing.InvalidField(f"items[{i}].regions[{j}].z_range",
                                       "the chunks covering it have no usable embedding")
            children.append((organ, vec))
        return record, enc.volume, children

    async def _flush(self, pending: list, resp: pb.IngestResponse) -> None:
        """Commit the prepared items of ``pending`` [(index, id, task)]; ack every one."""
        if not pending:
            return
        entries = list(pending)
        prepared = await asyncio.gather(*(task for _, _, task in entries),
                                        return_exceptions=True)
        pending.clear()
        ready = [p for p in prepared if not isinstance(p, BaseException)]
        outcomes = iter(())
        if ready:
            t0 = time.perf_counter()
            outcomes = iter(await run_in(self.index_pool, self._commit, ready))
            self.metrics.stage.labels("store_commit").observe(time.perf_counter() - t0)
        for (index, item_id, _), p in zip(entries, prepared):  # after the commit: the acks
            ack = resp.acks.add(index=index, id=_ack_id(item_id))
            if isinstance(p, BaseException):  # refused before the store
                result, parts_error = p, None
            else:
                result, parts_error = next(outcomes)
                if isinstance(result, BaseException):
                    result = _store_fault(result, f"items[{index}]")
            if isinstance(result, BaseException):
                ack.status = "failed"
                ack.error.CopyFrom(classify(result, self.unavailable, "Ingest").proto())
                resp.failed += 1
                continue
            ack.status, ack.duplicate_of = result.status, result.duplicate_of or ""
            resp.inserted += result.status == "inserted"
            resp.updated += result.status == "updated"
            resp.duplicates += result.status == "duplicate"
            if parts_error is not None:
                ack.error.CopyFrom(classify(_store_fault(
                    parts_error, f"items[{index}]", "the item was stored, its chunks and "
                                                    "regions were not"),
                    self.unavailable, "Ingest").proto())

    def _commit(self, batch: list) -> list:
        """On the index thread: store prepared items [(record, embedding, children, origin)].

        Returns, per item, ``(UpsertResult or exception, exception or None)``: the item's
        result (or why nothing of it was stored), and why its children were not stored.
        The items commit together; when that fails, one by one, so that only the bad one
        fails. The children of the written items commit after them."""
        results = self._upsert_by_dim([b[0] for b in batch], [b[1] for b in batch])
        written = {r.id for r in results if not isinstance(r, BaseException)
                   and r.status != "duplicate"}
        families = [(rec.id, cs) for rec, _, cs, _ in batch if rec.id in written and cs]
        parts_errors: dict[str, BaseException] = {}
        if families:
            try:
                self._store_children([c for _, cs in families for c in cs])
            except Exception:  # noqa: BLE001 - found out family by family
                for parent, kids in families:
                    try:
                        self._store_children(kids)
                    except Exception as exc:  # noqa: BLE001 - this item's, acked with it
                        parts_errors[parent] = exc
        kept = {c.id for parent, cs in families if parent not in parts_errors for c, _ in cs}
        try:  # the items are committed: whatever fails now must not cost their acks
            self._drop_stale_children([r.id for r in results if not isinstance(r, BaseException)
                                       and r.status == "updated"], kept)
            self._record_origins(batch, results)
            self.catalog.sync()
            self.update_index_gauges()
        except Exception as exc:  # noqa: BLE001 - INTERNAL, logged; the next sync catches up
            classify(exc, self.unavailable, "Ingest")
        return [(r, None if isinstance(r, BaseException) else parts_errors.get(r.id))
                for r in results]

    def _record_origins(self, batch: list, results: list) -> None:
        """Clinical mode: the original UIDs of the items just written (an item written
        from non-DICOM content loses any origin its id had); nothing in research mode."""
        if self.reident is None:
            return
        written = [(b[0].id, b[3]) for b, r in zip(batch, results)
                   if not isinstance(r, BaseException) and r.status != "duplicate"]
        self.reident.record({i: o for i, o in written if o is not None})
        self.reident.forget([i for i, o in written if o is None])

    def _store_children(self, kids: list) -> None:
        """Upsert [(child record, embedding)] (one transaction), recording the store's region
        pathway first when they include image regions."""
        enc = self.encoding
        if enc.stored_pathway is None and any(c.box is not None for c, _ in kids):
            # before the children: a crash in between leaves a mark and no children
            self.store.set_meta(enc.pathway_key, enc.region_pathway)
            enc.stored_pathway = enc.region_pathway
        self.store.upsert([c for c, _ in kids], np.stack([e for _, e in kids]))

    def _upsert_by_dim(self, records: list, embs: list) -> list:
        """``store.upsert`` of items whose embeddings may differ in dim (hybrid reports
        beside images): one upsert per dim, results (an ``UpsertResult``, or the exception
        that refused the item) in the order of ``records``. Each upsert commits on its own
        (all or nothing); a refused one is retried item by item. All are acknowledged
        after the last."""
        results: list = [None] * len(records)
        for dim in sorted({int(e.shape[0]) for e in embs}):
            rows = [i for i, e in enumerate(embs) if e.shape[0] == dim]
            try:
                got = self.store.upsert([records[i] for i in rows],
                                        np.stack([embs[i] for i in rows]))
            except Exception as exc:  # noqa: BLE001 - whose fault it is, is found one by one
                got = [exc] if len(rows) == 1 else [self._upsert_one(records[i], embs[i])
                                                    for i in rows]
            for i, r in zip(rows, got):
                results[i] = r
        return results

    def _upsert_one(self, record, emb: np.ndarray):
        try:
            return self.store.upsert([record], emb[None])[0]
        except Exception as exc:  # noqa: BLE001 - this item's failure, acked with it
            return exc

    def _drop_stale_children(self, parents: list[str], kept: set[str]) -> None:
        """An updated item keeps only the chunks and regions of its new version."""
        if not parents:
            return
        search, stale = self.config.search, []
        for collection in (search.chunk_collection, search.region_collection):
            for rows in self.reader.children(parents, collection).values():
                stale += [r.id for r in rows if r.id not in kept]
        if stale:
            self.store.delete(stale)

    def delete(self, ids: list[str]) -> pb.DeleteResponse:
        if not ids:
            raise ing.InvalidField("ids", "at least one id is required")
        missing = sorted(set(ids) - set(self.store.get(ids)))
        if missing:
            raise NotFound(f"ids: no stored items {missing[:5]}")
        deleted = self.store.delete(ids)
        if self.reident is not None:
            self.reident.forget(list(deleted))
        self.catalog.sync()
        self.update_index_gauges()
        return pb.DeleteResponse(deleted=deleted)


def _failed(exc: BaseException) -> asyncio.Future:
    """A finished future that failed with ``exc`` (an item that failed before any work)."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_exception(exc)
    return fut


def _ack_id(item_id: str) -> str:
    """The id an ack echoes: the client's own, unless it is no valid id (its index says
    which item it was)."""
    try:
        ing.check_item_id(item_id, "id")
    except ing.InvalidField:
        return ""
    return item_id


def _store_fault(exc: BaseException, field: str, what: str = "the store refused it"
                 ) -> BaseException:
    """A store's ``ValueError`` on a record names what was wrong with the item (a client
    fault); anything else, a ``TypeError`` included, stays what it is (INTERNAL)."""
    if isinstance(exc, ValueError) and not isinstance(exc, ing.InvalidField):
        return ing.InvalidField(field, f"{what}: {exc}")
    return exc
