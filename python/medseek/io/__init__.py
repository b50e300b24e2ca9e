"""Reading medical images: DICOM, NIfTI, PNG and JPEG; series to volumes; de-identification.

Every reader accepts a path, bytes or a binary file object (the gRPC service passes the
uploaded bytes), checks sizes from headers against :class:`ReadLimits` before decoding,
and raises :class:`MedicalImageError` (a ``ValueError``) naming the input for anything
corrupt, truncated or inconsistent.

* :func:`read_image` - one 2D image (DICOM, PNG, JPEG) -> :class:`Image2D`.
* :func:`read_dicom_series` - a DICOM series (directory, zip, list) or multi-frame DICOM
  -> :class:`Volume`.
* :func:`read_nifti` - ``.nii``/``.nii.gz`` -> :class:`Volume` in the canonical layout.
* :func:`read_volume` - either of the two above, chosen by content.
* :func:`deidentify` - PS3.15 Basic Profile on a pydicom dataset, keyed by :class:`DeidConfig`.
* :func:`discover` / :func:`group_dicom` - DICOM as a PACS exports it (folder, zip,
  DICOMDIR; files found by content) grouped by study and series into ingest items.
"""

from __future__ import annotations

import os
from typing import Sequence

from .deid import BASIC_PROFILE, DeidConfig, DeidRecord, deidentify
from .dicom_groups import DicomGrouping, DicomItem, SkippedFile, discover, group_dicom
from .errors import LimitExceededError, MedicalImageError
from .images import read_image, unit_intensity
from .limits import ReadLimits
from .nifti import is_nifti, read_nifti
from .records import Image2D, Volume
from .series import read_dicom_series
from .sources import Source, read_source

__all__ = [
    "BASIC_PROFILE",
    "DeidConfig",
    "DeidRecord",
    "DicomGrouping",
    "DicomItem",
    "Image2D",
    "LimitExceededError",
    "MedicalImageError",
    "ReadLimits",
    "SkippedFile",
    "Volume",
    "deidentify",
    "discover",
    "group_dicom",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_volume",
    "unit_intensity",
]


def read_volume(
    source: Source | Sequence[Source],
    *,
    limits: ReadLimits | None = None,
    deid: DeidConfig | None = None,
    volume_index: int | None = None,
    gap_tolerance: float = 0.05,
    name: str | None = None,
) -> Volume:
    """Read a volume from NIfTI content or a DICOM series, recognised by content.

    A directory or a list is read as a DICOM series; a single input is NIfTI when it
    carries the NIfTI magic (after gunzip), else a DICOM zip archive or multi-frame file.
    ``deid`` applies to DICOM only (NIfTI headers carry no identifiers that are read);
    ``volume_index`` to NIfTI only. See :func:`read_nifti` and :func:`read_dicom_series`.
    """
    limits = limits if limits is not None else ReadLimits()
    if isinstance(source, (list, tuple)) or (
        isinstance(source, (str, os.PathLike)) and os.path.isdir(source)
    ):
        return read_dicom_series(source, limits=limits, deid=deid, gap_tolerance=gap_tolerance, name=name)
    data, label = read_source(source, limits, name)
    if is_nifti(data, label):
        return read_nifti(data, limits=limits, volume_index=volume_index, name=label)
    return read_dicom_series(data, limits=limits, deid=deid, gap_tolerance=gap_tolerance, name=label)
