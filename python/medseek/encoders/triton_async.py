"""asyncio Triton encoder (``tritonclient.grpc.aio``) for async front ends.

Same models (``cfg.model_prefix`` included), preprocessing, batching, deadlines, retries
and errors as :class:`~medseek.encoders.TritonEncoder`; the requests of one call run concurrently on
the event loop (``asyncio.gather``) instead of a thread pool, and retries wait with
``asyncio.sleep``, so a slow or restarting server never blocks the loop.

    async with AsyncTritonEncoder(TritonEncoderConfig("127.0.0.1:8001"), spec) as enc:
        vectors = await enc.encode_images(images)
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from .base import EncoderInputError, EncoderSpec, VolumeChunks
from .preprocess import (batches, check_image_regions, check_images, check_texts,
                         chunk_z_ranges, group_chunks, volume_tokens)
from .triton_client import (CHANNEL_ARGS, TEXT_MODEL, TritonEncoderConfig, make_request,
                            retry_delay_or_raise)


class AsyncTritonEncoder:
    """The :class:`~medseek.encoders.Encoder` methods as coroutines, over Triton's gRPC API."""

    def __init__(self, cfg: TritonEncoderConfig, spec: EncoderSpec) -> None:
        import tritonclient.grpc.aio as aio

        self.cfg = cfg
        self.spec = spec
        self._aio = aio
        self.client = aio.InferenceServerClient(cfg.url, channel_args=CHANNEL_ARGS)
        self._slots = asyncio.Semaphore(cfg.max_in_flight)

    @property
    def dim(self) -> int:
        return self.spec.embed_dim

    async def _infer(self, model: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        from tritonclient.utils import InferenceServerException

        tensors, wanted = make_request(self._aio, inputs, outputs)
        start = time.monotonic()
        for attempt in range(self.cfg.retries + 1):
            try:
                async with self._slots:
                    result = await self.client.infer(model, tensors, model_version=self.cfg.version,
                                                     outputs=wanted,
                                                     client_timeout=self.cfg.client_timeout)
                return [result.as_numpy(n) for n in outputs]
            except InferenceServerException as exc:
                await asyncio.sleep(retry_delay_or_raise(exc, self.cfg, model, attempt, start))
        raise AssertionError("unreachable")

    async def _batched(self, graph: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        n = next(iter(inputs.values())).shape[0]
        parts = await asyncio.gather(*(
            self._infer(self.cfg.graph_model(graph), {k: v[s] for k, v in inputs.items()},
                        outputs)
            for s in batches(n, self.cfg.batch_size)))
        return [np.concatenate([p[i] for p in parts]) for i in range(len(outputs))]

    async def encode_images(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images, self.spec)
        return (await self._batched("image", {"images": images}, ["embeddings"]))[0]

    @property
    def region_pathway(self) -> bool:
        """True when :meth:`encode_image_regions` runs the model's trained region pathway."""
        return self.spec.modality == "image" and self.spec.region_head

    async def encode_image_regions(self, images: np.ndarray, boxes: np.ndarray):
        """As :meth:`medseek.encoders.base.GraphEncoder.encode_image_regions`: global
        (B, dim) and region (B, R, dim) embeddings through ``image_region_encoder``."""
        images, boxes = check_image_regions(images, boxes, self.spec)
        glob, regions = await self._batched("image_regions", {"images": images, "boxes": boxes},
                                            ["embeddings", "region_embeddings"])
        return glob, regions

    async def encode_texts(self, texts) -> np.ndarray:
        texts = check_texts(texts)
        raw = np.array([[t.encode("utf-8")] for t in texts], dtype=object)  # (B, 1)
        parts = await asyncio.gather(*(self._infer(self.cfg.model(TEXT_MODEL), {"TEXT": raw[s]},
                                                   ["embeddings"])
                                       for s in batches(len(texts), self.cfg.batch_size)))
        return np.concatenate([p[0] for p in parts])

    async def encode_volumes(self, volumes) -> np.ndarray:
        """As :meth:`medseek.encoders.base.GraphEncoder.encode_volumes`: chunk graph on every
        volume's chunks (concurrently), then the pool graph."""
        toks, feats = await self._chunk_outputs(volumes, ["chunk_features"])
        return await self._pool_chunks(toks, [f[0] for f in feats])

    async def encode_volume_chunks(self, volumes) -> list[VolumeChunks]:
        """As :meth:`medseek.encoders.base.GraphEncoder.encode_volume_chunks`."""
        toks, feats = await self._chunk_outputs(volumes, ["chunk_features", "chunk_embeddings"])
        pooled = await self._pool_chunks(toks, [f[0] for f in feats])
        return [VolumeChunks(pooled[i], np.ascontiguousarray(f[1], dtype=np.float32),
                             chunk_z_ranges(vt.z_start, vt.valid))
                for i, (vt, f) in enumerate(zip(toks, feats))]

    async def _chunk_outputs(self, volumes, outputs: list[str]):
        if isinstance(volumes, np.ndarray) or not isinstance(volumes, (list, tuple)) or not volumes:
            raise EncoderInputError("volumes must be a non-empty list of (D, H, W) arrays")
        toks = [volume_tokens(v, self.spec) for v in volumes]
        feats = await asyncio.gather(*(
            self._batched("chunks", {"tokens": vt.tokens, "positions": vt.positions,
                                     "token_mask": vt.token_mask}, outputs)
            for vt in toks))
        return toks, feats

    async def _pool_chunks(self, toks, feats: list[np.ndarray]) -> np.ndarray:
        grouped, mask = group_chunks(np.concatenate(feats), [vt.n_chunks for vt in toks])
        return (await self._batched("pool", {"chunk_features": grouped, "chunk_mask": mask},
                                    ["embeddings"]))[0]

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "AsyncTritonEncoder":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
