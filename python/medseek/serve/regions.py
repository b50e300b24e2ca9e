"""Which pathway embeds an image's regions, and the batched call of the region pathway.

Two pathways embed a box of an image (a region child at ingest, a region query):

* ``region_head``: when the encoder's model has a trained region pathway
  (``encoder.region_pathway``, the exported spec's ``region_head``: WristMIR), the image's
  patch tokens are pooled over the box and projected by the model's region head, in the
  same pass as the image's global embedding (``encoder.encode_image_regions``; boxes in
  model-input pixels, :func:`medseek.serve.ingest.model_box`);
* ``crop``: otherwise the box is cropped from the full image, resized to the model's
  input size and embedded by the global image tower (:func:`medseek.serve.ingest.crop`).

The two give vectors of different distributions, so one store must not mix them: the
pathway that embedded a store's image region children is recorded in the store's meta
table under :func:`meta_key` (per model tag and region collection) at their first
commit; a server whose pathway differs refuses region ingests and box queries
(FAILED_PRECONDITION) instead of comparing crop vectors with region-head vectors.
``item_id`` region queries compare stored vectors only and are always served.
"""

from __future__ import annotations

import numpy as np

from .errors import FailedPrecondition

REGION_HEAD, CROP = "region_head", "crop"


def pathway_of(encoder) -> str:
    """``"region_head"`` when ``encoder`` has a region pathway, else ``"crop"``."""
    return REGION_HEAD if getattr(encoder, "region_pathway", False) else CROP


def meta_key(model: str, collection: str) -> str:
    """Store meta key recording the pathway of the image region children of ``collection``
    embedded under the store's model tag ``model``."""
    return f"region_pathway/{model}/{collection}"


def check_pathway(stored: str | None, mine: str, field: str, key: str) -> None:
    """Raise :class:`FailedPrecondition` when the store's region children were embedded by
    another pathway than this server's (``stored`` None: none recorded yet)."""
    if stored is not None and stored != mine:
        raise FailedPrecondition(
            f"{field}: this store's image region children were embedded by the {stored!r} "
            f"pathway (store meta {key!r}) but this server's encoder embeds regions by "
            f"{mine!r}; a region vector of one is not comparable with the other. Serve this "
            "model under a model tag of its own (ServeConfig.model) or into a fresh store, "
            "and re-ingest")


def encode_region_rows(encoder, images: list[np.ndarray],
                       boxes: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``encode_image_regions`` call for images with different numbers of boxes.

    Parameters
    ----------
    images : list of (1, H, W) float32 encoder inputs
    boxes : list of (R_i, 4) float32 boxes in model-input pixels, R_i >= 1

    Returns
    -------
    list of (global (dim,), regions (R_i, dim)) float32

    Rows with fewer boxes than the largest are padded with the whole-image box (every row
    of the graph needs R boxes with area; the padding's embeddings are dropped). Pooling
    is per box, so the padding changes no other box's embedding.
    """
    if len(images) != len(boxes) or not images:
        raise ValueError(f"images and boxes must be non-empty lists of one length, got "
                         f"{len(images)} and {len(boxes)}")
    h, w = images[0].shape[-2:]
    most = max(b.shape[0] for b in boxes)
    padded = np.empty((len(boxes), most, 4), dtype=np.float32)
    padded[:] = np.array([0.0, 0.0, w, h], dtype=np.float32)
    for i, b in enumerate(boxes):
        padded[i, :b.shape[0]] = b
    glob, regions = encoder.encode_image_regions(np.stack(images).astype(np.float32), padded)
    glob = np.asarray(glob, dtype=np.float32)
    regions = np.asarray(regions, dtype=np.float32)
    return [(glob[i], regions[i, :b.shape[0]]) for i, b in enumerate(boxes)]
