"""Decoding and encoding for both services: uploaded content -> encoder input -> embeddings.

Decoding (pixels, de-identification) runs on a pool of two threads; the encoder runs on
one thread, fed by the encode micro-batcher, so concurrent queries and ingests share
encoder batches. Also here: which route content takes to an encoder (the hybrid report
ranker's text), and which pathway embeds image regions (``medseek.serve.regions``).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import ingest as ing
from . import regions as rp
from .batcher import MicroBatcher
from .errors import decoding


async def run_in(pool: ThreadPoolExecutor, fn, *args):
    """``fn(*args)`` on ``pool``, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class Encoding:
    """The decode pool, the encoder thread and its micro-batcher, and the region pathway.

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
        self.decode_pool = ThreadPoolExecutor(2, thread_name_prefix="medseek-decode")
        self.encode_pool = ThreadPoolExecutor(1, thread_name_prefix="medseek-encode")
        self.batcher = MicroBatcher("encode", self._encode_batch, config.encode_batch,
                                    self.encode_pool, metrics.on_batch)

    @property
    def chunked(self) -> bool:
        """Whether the encoder gives chunk embeddings of volumes (organ regions need them)."""
        return hasattr(self.encoder, "encode_volume_chunks")

    def check_pathway(self, field: str) -> None:
        """Refuse image regions when the store's were embedded by another pathway."""
        rp.check_pathway(self.stored_pathway, self.region_pathway, field, self.pathway_key)

    async def close(self) -> None:
        await self.batcher.close()
        for pool in (self.decode_pool, self.encode_pool):
            pool.shutdown(wait=True)

    # -- the event loop's side ------------------------------------------------------------
    async def decode(self, kind: str, value, field: str) -> ing.Decoded:
        t0 = time.perf_counter()
        c = self.config
        dec = await run_in(self.decode_pool, _decode_content, kind, value, field,
                           c.preprocess, c.limits, c.deid, c.budget)
        self.metrics.stage.labels("decode").observe(time.perf_counter() - t0)
        return dec

    async def encode(self, kind: str, field: str, content):
        """The embedding(s) of one input through the encode micro-batcher."""
        return await self.batcher.submit(kind, (field, content))

    async def encode_chunked(self, dec: ing.Decoded, field: str):
        """One encoder pass over a decoded volume: its embeddings (``enc.volume``,
        ``enc.chunks``) and each chunk's half-open z-range ``[z0, z1)`` in slices of the
        volume as uploaded."""
        enc = await self.encode("volume_chunks", field, dec.payload)
        return enc, ing.source_z_ranges(enc.z_range, dec.z_scale, dec.source_depth,
                                        dec.payload.shape[0])

    def route(self, kind: str, collection: str, field: str) -> str:
        """The encoder route of ``kind`` content bound for ``collection``: text of a
        hybrid report collection goes to the report ranker ("report_text"); nothing but
        text (or a stored report's item_id) can enter or query that collection."""
        r = self.report_ranker
        if r is None or r.encoder is None or collection != r.collection:
            return kind
        if kind != "text":
            raise ing.InvalidField(field, f"collection {collection!r} holds hybrid report "
                                          f"embeddings (dim {r.dim}, report_ranker 'hybrid'): "
                                          f"only text can be stored in or query it, not {kind}")
        return "report_text"

    # -- the encoder thread ---------------------------------------------------------------
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


def _nan(field: str) -> ing.InvalidField:
    return ing.InvalidField(field, "the encoder produced a NaN embedding")


def _decode_content(kind: str, value, field: str, *args) -> ing.Decoded:
    """``ing.decode_content``; corrupt compressed content is ``field``'s fault."""
    with decoding(field):
        return ing.decode_content(kind, value, field, *args)
