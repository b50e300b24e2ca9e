"""What the readers return: :class:`Image2D` and :class:`Volume`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .deid import DeidRecord


@dataclass
class Image2D:
    """One 2D image, higher value = brighter.

    Attributes
    ----------
    pixels : np.ndarray
        ``(H, W)``; uint8 for 8-bit sources, uint16/int16 for 16-bit ones, float32
        when a non-integral rescale was applied (or for float sources).
    spacing : (float, float) or None
        ``(sy, sx)`` in mm between rows and between columns; None when unknown.
    modality, body_part, view : str or None
        DICOM Modality, Body Part Examined, View Position (None for PNG/JPEG).
    photometric : str
        Photometric interpretation of the source (``"MONOCHROME1"`` means the values
        were inverted, ``"RGB"`` that they were reduced to luminance); PNG/JPEG sources
        report the Pillow mode they were converted from, e.g. ``"RGB"`` or ``"L"``.
    meta : dict
        Non-identifying technical attributes, plus the pseudonyms when de-identified.
    deid : DeidRecord or None
        What de-identification did; None when no :class:`DeidConfig` was given (then
        ``meta`` holds no identifiers at all).
    """

    pixels: np.ndarray
    spacing: tuple[float, float] | None
    modality: str | None = None
    body_part: str | None = None
    view: str | None = None
    photometric: str = "MONOCHROME2"
    meta: dict[str, Any] = field(default_factory=dict)
    deid: DeidRecord | None = None


@dataclass
class Volume:
    """A 3D volume in the layout of ``medseek.volume``.

    Attributes
    ----------
    array : np.ndarray
        ``(D, H, W)`` = (z, y, x), C-contiguous, int16, uint16 or float32, rescale applied.
    spacing : (float, float, float)
        ``(sz, sy, sx)`` in mm.
    origin : (float, float, float)
        Patient-space position (mm) of the centre of voxel ``[0, 0, 0]``, in DICOM LPS
        coordinates (x to the patient's left, y posterior, z superior).
    direction : np.ndarray
        ``(3, 3)`` float64; row ``a`` is the LPS unit vector along array axis ``a``, so
        voxel ``[k, i, j]`` lies at ``origin + (k*sz, i*sy, j*sx) @ direction``.
    modality, body_part : str or None
    meta : dict
        Non-identifying technical attributes, plus the pseudonyms when de-identified.
    deid : DeidRecord or None
        The record of the first slice/file (all slices get the same pseudonyms).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: str | None = None
    body_part: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    deid: DeidRecord | None = None

    def voxel_to_patient(self, index: tuple[float, float, float]) -> np.ndarray:
        """LPS position (mm) of array index ``(k, i, j)``; shape ``(3,)`` float64."""
        steps = np.asarray(index, dtype=np.float64) * np.asarray(self.spacing, dtype=np.float64)
        return np.asarray(self.origin, dtype=np.float64) + steps @ self.direction
