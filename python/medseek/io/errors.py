"""Exceptions raised by the medseek readers.

Messages name the input (a path, ``"<bytes>"`` or a zip member) and what is wrong with
it. They never quote the content of identifying DICOM attributes: a reader that fails
part-way through a file reports the structure that was wrong, not the value it held.
"""

from __future__ import annotations


class MedicalImageError(ValueError):
    """An input is not a readable image: corrupt, truncated, unsupported or inconsistent."""


class LimitExceededError(MedicalImageError):
    """An input declares a size beyond the configured :class:`~medseek.io.ReadLimits`.

    Raised from header information, before any pixel memory is allocated.
    """
