"""``LocalTorchEncoder``: an in-process torch encoder with the ``Encoder`` interface.

Texts go through the pretrained all-MiniLM-L6-v2 (``TextEncoder``, real sentence
embeddings); images and volumes through the tiny vision towers of ``cxr-tiny`` and
``ct-tiny`` with their visual heads projecting to the same dimension (384). The vision
towers are *untrained* (seeded, so deterministic): image-image and volume-volume scores are
real computations but carry no clinical meaning, and text-image scores none at all. It
exists so that the service runs and is tested on a CPU-only machine without Triton;
production serves the trained towers through ``medseek.encoders`` (Triton or in-process
ONNX Runtime), which implement the same methods.
"""

from __future__ import annotations

import numpy as np


class LocalTorchEncoder:
    """Encoder protocol: ``dim``, ``encode_images``, ``encode_volumes``, ``encode_texts``;
    and ``encode_volume_chunks`` (volume and chunk embeddings of one pass).

    Parameters
    ----------
    seed : int
        Seed of the untrained vision towers' initialisation.
    image_model, volume_model : str
        ``medseek.models`` config names of the vision towers.
    """

    def __init__(self, seed: int = 0, image_model: str = "cxr-tiny",
                 volume_model: str = "ct-tiny") -> None:
        import torch

        from medseek.models.factory import create_model
        from medseek.models.text_tower import TextEncoder

        self._text = TextEncoder(max_length=128)
        self.dim = int(self._text.dim)
        with torch.random.fork_rng(devices=[]):  # seeded without touching the global RNG
            torch.manual_seed(seed)
            self._image = create_model(image_model, embed_dim=self.dim).eval()
            torch.manual_seed(seed + 1)
            self._volume = create_model(volume_model, embed_dim=self.dim).eval()
        self._patch = tuple(self._volume.cfg.vision.patch_size)
        #: input geometry the service prepares for (see medseek.serve.routed.input_geometry)
        self.image_size = tuple(self._image.cfg.preprocess.image_size or (64, 64))
        self.volume_multiple = self._patch[1:]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """``texts`` -> (B, dim) float32, unit rows."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of str")
        return np.ascontiguousarray(self._text.encode(list(texts)), dtype=np.float32)

    def encode_images(self, images: np.ndarray) -> np.ndarray:
        """``images`` (B, 1, H, W) float32 in [0, 1] -> (B, dim) float32, unit rows."""
        import torch

        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be a (B, 1, H, W) array, got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        if images.dtype != np.float32 or not np.isfinite(images).all():
            raise ValueError("images must be finite float32")
        with torch.inference_mode():
            out = self._image.encode_image(torch.from_numpy(np.ascontiguousarray(images)))
        return out.numpy().astype(np.float32)

    def encode_volumes(self, volumes: list[np.ndarray]) -> np.ndarray:
        """Windowed (D, H, W) float32 volumes in [0, 1] -> (B, dim) float32, unit rows.

        H and W are centre-cropped to multiples of the patch size; each volume is chunked
        along z by the tower (any depth).
        """
        out = [enc.volume.numpy() for enc in self._volume_encodings(volumes)]
        return np.stack(out).astype(np.float32).reshape(len(out), self.dim)

    def encode_volume_chunks(self, volumes: list[np.ndarray]) -> list:
        """As ``encode_volumes``, with each volume's chunk embeddings and z-ranges
        (:class:`medseek.encoders.base.VolumeChunks`, slices of the input volume)."""
        from medseek.encoders.base import VolumeChunks
        from medseek.encoders.preprocess import chunk_z_ranges

        return [VolumeChunks(enc.volume.numpy().astype(np.float32).reshape(self.dim),
                             np.ascontiguousarray(enc.chunks.numpy(), dtype=np.float32),
                             chunk_z_ranges(enc.z_start, enc.valid))
                for enc in self._volume_encodings(volumes)]

    def _volume_encodings(self, volumes: list[np.ndarray]) -> list:
        import torch

        _, py, px = self._patch
        out = []
        for i, vol in enumerate(volumes):
            if not isinstance(vol, np.ndarray) or vol.ndim != 3 or vol.dtype != np.float32:
                raise ValueError(f"volumes[{i}] must be a (D, H, W) float32 array, got "
                                 f"{getattr(vol, 'shape', type(vol).__name__)}")
            h, w = (vol.shape[1] // py) * py, (vol.shape[2] // px) * px
            if h == 0 or w == 0:
                raise ValueError(f"volumes[{i}] has H x W {vol.shape[1:]}, smaller than one "
                                 f"{py}x{px} patch")
            if not np.isfinite(vol).all():
                raise ValueError(f"volumes[{i}] contains NaN or infinite values")
            y0, x0 = (vol.shape[1] - h) // 2, (vol.shape[2] - w) // 2
            crop = np.ascontiguousarray(vol[:, y0:y0 + h, x0:x0 + w])
            with torch.inference_mode():
                out.append(self._volume.encode_volume_array(crop))
        return out
