"""Decoding and encoding for both services: uploaded content -> encoder input -> embeddings.

Work is split into three lanes (``ServeConfig.encode_lanes``): text, image and volume.
Each lane has its own decode threads (text is decoded on the event loop), its own encode
micro-batcher and encoder worker thread(s), and its own bounded queue, so a light text
query never waits behind an image or a volume being decoded or encoded, and a full heavy
lane refuses its own requests (RESOURCE_EXHAUSTED naming the lane) and nobody else's.
Within a lane, concurrent queries and ingests share encoder batches. Also here: which
route content takes to an encoder (the hybrid report ranker's text), and which pathway
embeds image regions (``medseek.serve.regions``).
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from . import ingest as ing
from . import item_records
from . import regions as rp
from .batcher import MicroBatcher, QueueFull
from .errors import decoding

#: the lane of each encoder route (``Encoding.encode``) and of each decoded content kind
LANE_OF = {"text": "text", "report_text": "text", "image": "image",
           "image_regions": "image", "volume": "volume", "volume_chunks": "volume"}
LANES = ("text", "image", "volume")


async def run_in(pool: ThreadPoolExecutor, fn, *args):
    """``fn(*args)`` on ``pool``, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class Lane:
    """One encode lane: decode threads (none for text), an encode micro-batcher with its
    worker thread(s), and the bound on the requests waiting in the lane.

    Waiting = waiting for a decode thread, or decoded and waiting for the encoder; a
    request past ``max_queue`` is refused with ``QueueFull`` naming the lane.
    """

    def __init__(self, name: str, spec, batch, run_batch, on_batch) -> None:
        self.name = name
        self.max_queue = spec.max_queue if spec.max_queue is not None else batch.max_queue
        self.max_queued_bytes = spec.max_queued_bytes
        self.queued_bytes = 0  # uploads admitted and not yet decoded
        init = (functools.partial(_place_thread, spec.nice, spec.cpus),)
        self.decode_pool = (None if name == "text" else
                            ThreadPoolExecutor(spec.decode_threads, f"medseek-decode-{name}",
                                               *init))
        self._decode_slots = asyncio.Semaphore(spec.decode_threads)
        #: SearchUpload streams of this lane read at once (``EncodeLane.uploads``)
        self.upload_slots = asyncio.Semaphore(spec.uploads)
        self.decode_waiting = 0
        self.encode_pool = ThreadPoolExecutor(spec.workers, f"medseek-encode-{name}", *init)
        self.batcher = MicroBatcher(f"encode_{name}", run_batch,
                                    replace(batch, max_queue=self.max_queue),
                                    self.encode_pool, on_batch, max_running=spec.workers)

    @property
    def depth(self) -> int:
        """Requests waiting in the lane (to be decoded, or to be encoded)."""
        return self.decode_waiting + self.batcher.depth

    def admit(self, nbytes: int = 0) -> None:
        """Refuse one more request of ``nbytes`` upload bytes over the lane's budgets."""
        if self.depth >= self.max_queue:
            raise QueueFull(f"encode {self.name} lane queue is full ({self.max_queue} "
                            f"waiting); other lanes are not affected")
        budget = self.max_queued_bytes
        if budget is not None and self.queued_bytes and self.queued_bytes + nbytes > budget:
            raise QueueFull(f"encode {self.name} lane holds {self.queued_bytes} upload bytes "
                            f"waiting to be decoded; {nbytes} more exceeds EncodeLane."
                            f"max_queued_bytes={budget}; other lanes are not affected")

    async def decode(self, fn, *args, nbytes: int = 0):
        """``fn(*args)`` on this lane's decode threads (on the loop for text); ``nbytes``:
        the upload's size, counted against ``max_queued_bytes`` until it is decoded."""
        if self.decode_pool is None:
            return fn(*args)
        self.admit(nbytes)
        self.decode_waiting += 1
        self.queued_bytes += nbytes
        try:
            try:
                await self._decode_slots.acquire()  # waiting here counts against max_queue
            finally:
                self.decode_waiting -= 1
            try:
                return await run_in(self.decode_pool, fn, *args)
            finally:
                self._decode_slots.release()
        finally:
            self.queued_bytes -= nbytes

    async def encode(self, key, payload):
        try:
            return await self.batcher.submit(key, payload)
        except QueueFull:
            raise QueueFull(f"encode {self.name} lane queue is full ({self.max_queue} "
                            f"waiting); other lanes are not affected") from None

    async def close(self) -> None:
        await self.batcher.close()
        for pool in (self.decode_pool, self.encode_pool):
            if pool is not None:
                pool.shutdown(wait=True)


class Encoding:
    """The encode lanes (decode threads, encoder workers and micro-batchers), and the
    region pathway.

    Parameters
    ----------
    config : ServeConfig
        With the encoder's input geometry already filled in.
    encoder : Encoder
    store : Store
        Its meta records the region pathway of the stored image regions.
    metrics : ServerMetrics
    report_ranker : ReportRanker, optional
        With a hybrid one, text bound for its collection is embedded by its encoder.
    """

    def __init__(self, config, encoder, store, metrics, report_ranker=None) -> None:
        self.config, self.encoder, self.metrics = config, encoder, metrics
        self.report_ranker = report_ranker
        # image regions: the model's region pathway when it has one, else crop + global
        # tower; the store records which one embedded its region children (serve.regions)
        self.region_pathway = rp.pathway_of(encoder)
        self.pathway_key = rp.meta_key(config.model, config.search.region_collection)
        self.stored_pathway = store.get_meta(self.pathway_key)
        self.lanes = {name: Lane(name, getattr(config.encode_lanes, name),
                                 config.encode_batch, self._encode_batch, metrics.on_batch)
                      for name in LANES}

    @property
    def depth(self) -> int:
        """Requests waiting in all lanes (to be decoded, or to be encoded)."""
        return sum(lane.depth for lane in self.lanes.values())

    def start(self) -> None:
        for lane in self.lanes.values():
            lane.batcher.start()

    @property
    def chunked(self) -> bool:
        """Whether the encoder gives chunk embeddings of volumes (organ regions need them)."""
        return hasattr(self.encoder, "encode_volume_chunks")

    def check_pathway(self, field: str) -> None:
        """Refuse image regions when the store's were embedded by another pathway."""
        rp.check_pathway(self.stored_pathway, self.region_pathway, field, self.pathway_key)

    async def close(self) -> None:
        for lane in self.lanes.values():
            await lane.close()

    # -- the event loop's side ------------------------------------------------------------
    async def decode(self, kind: str, value, field: str) -> ing.Decoded:
        t0 = time.perf_counter()
        c = self.config
        nbytes = len(value) if isinstance(value, (bytes, memoryview)) else 0
        dec = await self.lanes[LANE_OF[kind]].decode(
            _decode_content, kind, value, field, c.preprocess, c.limits, c.deid, c.budget,
            nbytes=nbytes)
        self.metrics.stage.labels("decode").observe(time.perf_counter() - t0)
        return dec

    async def encode(self, kind: str, field: str, content):
        """The embedding(s) of one input through its lane's encode micro-batcher."""
        return await self.lanes[LANE_OF[kind]].encode(kind, (field, content))

    async def encode_chunked(self, dec: ing.Decoded, field: str):
        """One encoder pass over a decoded volume: its embeddings (``enc.volume``,
        ``enc.chunks``) and each chunk's half-open z-range ``[z0, z1)`` in slices of the
        volume as uploaded."""
        enc = await self.encode("volume_chunks", field, dec.payload)
        return enc, item_records.source_z_ranges(enc.z_range, dec.z_scale, dec.source_depth,
                                        dec.payload.shape[0])

    def route(self, kind: str, collection: str, field: str) -> str:
        """The encoder route of ``kind`` content bound for ``collection``: text of a
        hybrid report collection goes to the report ranker ("report_text"); nothing but
        text (or a stored report's item_id) can enter or query that collection. Text
        for an image-only encoder (``encodes_text`` False: a DINOv2 checkpoint) is
        refused here, naming ``field``."""
        r = self.report_ranker
        if r is None or r.encoder is None or collection != r.collection:
            if kind == "text" and not getattr(self.encoder, "encodes_text", True):
                raise ing.InvalidField(field, f"collection {collection!r} is served by an "
                                              "image-only encoder (no text tower): query it "
                                              "with an image or an item_id")
            return kind
        if kind != "text":
            raise ing.InvalidField(field, f"collection {collection!r} holds hybrid report "
                                          f"embeddings (dim {r.dim}, report_ranker 'hybrid'): "
                                          f"only text can be stored in or query it, not {kind}")
        return "report_text"

    # -- the encoder threads (each runs one lane's batch at a time) -----------------------
    def _encode_batch(self, kind: str, payloads: list) -> list:
        """``payloads``: [(field, content)] of one kind -> [(dim,) or exception].

        A ``ValueError`` of the encoder rejects that content (INVALID_ARGUMENT); anything
        else it raises, a ``TypeError`` included, is a bug of the encoder (INTERNAL).
        """
        try:
            return self._encode_rows(kind, payloads)
        except ValueError:
            if len(payloads) == 1:
                raise ing.InvalidField(payloads[0][0], "rejected by the encoder") from None
        out = []  # one bad input must not fail its batch-mates: retry one by one
        for p in payloads:
            try:
                out.append(self._encode_rows(kind, [p])[0])
            except ValueError:
                out.append(ing.InvalidField(p[0], "rejected by the encoder"))
            except Exception as exc:  # noqa: BLE001 - this input's failure, not its mates'
                out.append(exc)
        return out

    def _encode_rows(self, kind: str, payloads: list) -> list:
        t0 = time.perf_counter()
        items = [c for _, c in payloads]
        if kind == "volume_chunks":  # [VolumeChunks]: volume and chunk embeddings of one pass
            encs = list(self.encoder.encode_volume_chunks(items))
            self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
            return [e if np.isfinite(e.volume).all() and np.isfinite(e.chunks).all()
                    else _nan(field) for (field, _), e in zip(payloads, encs)]
        if kind == "image_regions":  # [(image (1, H, W), boxes (R, 4))]: one pass each
            encs = rp.encode_region_rows(self.encoder, [c[0] for c in items],
                                         [c[1] for c in items])
            self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
            return [e if np.isfinite(e[0]).all() and np.isfinite(e[1]).all()
                    else _nan(field) for (field, _), e in zip(payloads, encs)]
        if kind == "report_text":  # the hybrid report ranker, in process
            embs = self.report_ranker.encoder.encode_texts(items)
        elif kind == "text":
            embs = self.encoder.encode_texts(items)
        elif kind == "image":
            embs = self.encoder.encode_images(np.stack(items).astype(np.float32))
        else:
            embs = self.encoder.encode_volumes(items)
        embs = np.asarray(embs, dtype=np.float32)
        self.metrics.stage.labels("encode").observe(time.perf_counter() - t0)
        return [row if np.isfinite(row).all() else _nan(field)
                for (field, _), row in zip(payloads, embs)]


def _place_thread(nice: int, cpus: tuple[int, ...] | None) -> None:
    """Lower this thread's scheduling priority by ``nice`` below the process's (so a
    server started under ``nice`` keeps its lanes apart) and keep it on ``cpus`` (Linux:
    both are per thread; threads it starts inherit them)."""
    tid = threading.get_native_id()
    if nice and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid)
                                                     + nice))
        except OSError:  # not permitted here: the lane runs at the process's priority
            pass
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        allowed = set(cpus) & os.sched_getaffinity(0)
        if allowed:  # none of them is ours: keep the process's CPUs
            os.sched_setaffinity(tid, allowed)


def _nan(field: str) -> ing.InvalidField:
    return ing.InvalidField(field, "the encoder produced a NaN embedding")


def _decode_content(kind: str, value, field: str, *args) -> ing.Decoded:
    """``ing.decode_content``; corrupt compressed content is ``field``'s fault. An upload
    split out of a large request (``serve.wire``) is copied here, on the lane's thread."""
    if isinstance(value, memoryview):
        value = value.tobytes()
    with decoding(field):
        return ing.decode_content(kind, value, field, *args)
