"""``RoutedEncoder``: one ``Encoder`` made of per-modality encoders.

Production serves one exported model per modality (a radiograph model and a volume model,
each with its text tower, behind Triton); the service takes one encoder, so this routes
``encode_images`` / ``encode_volumes`` / ``encode_texts`` to the right one (and
``encode_volume_chunks`` when the volume encoder has it, and ``encode_image_regions`` when
the image encoder has a region pathway). All must share ``dim`` (one
embedding space).
"""

from __future__ import annotations


class RoutedEncoder:
    """Route each ``encode_*`` call to its modality's encoder.

    Parameters
    ----------
    images, volumes : Encoder
    texts : Encoder, optional
        Default: ``images``.
    """

    #: the image encoder's model has a region pathway (``encode_image_regions``)
    region_pathway = False

    def __init__(self, images, volumes, texts=None) -> None:
        self.images, self.volumes = images, volumes
        self.texts = texts if texts is not None else images
        dims = {int(e.dim) for e in (self.images, self.volumes, self.texts)}
        if len(dims) != 1:
            raise ValueError(f"images, volumes and texts encoders must share dim, got {dims}")
        self.dim = dims.pop()
        if hasattr(volumes, "encode_volume_chunks"):  # offered only when the volume side can
            self.encode_volume_chunks = volumes.encode_volume_chunks
        if getattr(images, "region_pathway", False):
            self.region_pathway = True
            self.encode_image_regions = images.encode_image_regions

    @property
    def image_size(self):
        return input_geometry(self.images)[0]

    @property
    def volume_multiple(self):
        return input_geometry(self.volumes)[1]

    def encode_images(self, images):
        return self.images.encode_images(images)

    def encode_volumes(self, volumes):
        return self.volumes.encode_volumes(volumes)

    def encode_texts(self, texts):
        return self.texts.encode_texts(texts)


def input_geometry(encoder) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(image_size, volume_multiple)`` an encoder expects, or None where it says nothing.

    Read from ``encoder.image_size`` / ``encoder.volume_multiple``, else from an
    ``EncoderSpec`` at ``encoder.spec`` (``image_size``; ``patch_size[1:]``).
    """
    size = getattr(encoder, "image_size", None)
    multiple = getattr(encoder, "volume_multiple", None)
    spec = getattr(encoder, "spec", None)
    if size is None and spec is not None:
        size = getattr(spec, "image_size", None)
    if multiple is None and spec is not None and getattr(spec, "patch_size", None):
        multiple = tuple(spec.patch_size[1:])
    return (tuple(size) if size else None), (tuple(multiple) if multiple else None)


def volume_preprocessing(encoder) -> dict:
    """``{"target_spacing": ..., "window": ..., "blend_window": ...}`` that a volume
    encoder's spec records (the preprocessing its model was trained with); empty when it
    records none. A spec with a window but no blend window clears the server's."""
    spec = getattr(encoder, "spec", None)
    out = {}
    for name in ("target_spacing", "window", "blend_window"):
        value = getattr(spec, name, None)
        if value is not None:
            out[name] = tuple(value)
    if "window" in out and "blend_window" not in out:
        out["blend_window"] = None
    return out