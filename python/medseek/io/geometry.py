"""Slice geometry: order slices along the slice normal and derive the z spacing.

For a stack of parallel slices with Image Orientation (Patient) ``(r, c)`` (row and
column direction cosines) the slice normal is ``n = r x c``. Each slice's Image Position
(Patient) ``p`` is projected, ``t = p . n``, and slices are sorted by ascending ``t``.
Instance Number, file names and Slice Thickness are never used: they are often wrong.
The z spacing is the median of the differences of the sorted ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MedicalImageError

#: Two orientations are "the same" when their direction cosines differ by at most this.
ORIENTATION_TOLERANCE = 1e-4
#: Two slice positions closer than this along the normal (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class StackGeometry:
    """Result of :func:`order_slices`.

    Attributes
    ----------
    order : np.ndarray
        int64 ``(D,)``; ``order[k]`` is the input index of the k-th slice along the normal.
    spacing_z : float
        Median distance (mm) between consecutive sorted slices.
    origin : np.ndarray
        float64 ``(3,)``, Image Position of the first sorted slice.
    direction : np.ndarray
        float64 ``(3, 3)``; rows are the LPS unit vectors of array axes (z, y, x):
        the normal, the column direction cosine, the row direction cosine.
    """

    order: np.ndarray
    spacing_z: float
    origin: np.ndarray
    direction: np.ndarray


def orientation_vectors(iop: object, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, col, normal)`` unit vectors from a 6-value Image Orientation (Patient)."""
    try:
        values = np.asarray([float(v) for v in iop], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise MedicalImageError(f"{name}: Image Orientation (Patient) is missing or not numeric") from None
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise MedicalImageError(f"{name}: Image Orientation (Patient) must hold 6 finite values, got {values.size}")
    row, col = values[:3], values[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if nr < 1e-6 or nc < 1e-6:
        raise MedicalImageError(f"{name}: Image Orientation (Patient) has a zero direction cosine")
    row, col = row / nr, col / nc
    if abs(float(row @ col)) > 1e-3:
        raise MedicalImageError(f"{name}: Image Orientation (Patient) row and column cosines are not orthogonal")
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def order_slices(
    positions: np.ndarray,
    orientations: np.ndarray,
    names: list[str],
    gap_tolerance: float,
) -> StackGeometry:
    """Sort slices along their common normal and check that they form a regular stack.

    Parameters
    ----------
    positions : np.ndarray
        float64 ``(D, 3)``, Image Position (Patient) of each slice, in input order.
    orientations : np.ndarray
        float64 ``(D, 6)``, Image Orientation (Patient) of each slice.
    names : list of str
        Label of each slice for error messages (file name or ``"frame k"``).
    gap_tolerance : float
        Largest allowed relative deviation of a gap from the median gap.

    Raises
    ------
    MedicalImageError
        Different orientations, two slices at one position, slices not stacked along
        the normal (sheared/tilted stack), or non-uniform gaps (e.g. a missing slice).
    """
    d = positions.shape[0]
    row, col, normal = orientation_vectors(orientations[0], names[0])
    for k in range(1, d):
        if np.max(np.abs(orientations[k] - orientations[0])) > ORIENTATION_TOLERANCE:
            raise MedicalImageError(
                f"{names[k]}: Image Orientation (Patient) differs from that of {names[0]}"
            )
    t = positions @ normal
    order = np.argsort(t, kind="stable")
    t_sorted = t[order]
    origin = positions[order[0]]
    direction = np.stack([normal, col, row])
    if d == 1:
        return StackGeometry(order, 0.0, origin, direction)
    gaps = np.diff(t_sorted)
    for k in np.flatnonzero(gaps < DUPLICATE_TOLERANCE_MM):
        raise MedicalImageError(
            f"{names[order[k + 1]]}: duplicate slice position, same as {names[order[k]]}"
        )
    offsets = positions[order] - origin
    lateral = offsets - np.outer(offsets @ normal, normal)
    worst = int(np.argmax(np.linalg.norm(lateral, axis=1)))
    if np.linalg.norm(lateral[worst]) > max(0.01, 0.01 * float(np.median(gaps))):
        raise MedicalImageError(
            f"{names[order[worst]]}: slice position is off the slice normal by "
            f"{np.linalg.norm(lateral[worst]):.3f} mm (sheared or tilted stack is not supported)"
        )
    spacing_z = float(np.median(gaps))
    deviation = np.abs(gaps - spacing_z) / spacing_z
    k = int(np.argmax(deviation))
    if deviation[k] > gap_tolerance:
        raise MedicalImageError(
            f"{names[order[k + 1]]}: non-uniform slice gap {gaps[k]:.4f} mm against median "
            f"{spacing_z:.4f} mm (relative deviation {deviation[k]:.3f} > gap_tolerance="
            f"{gap_tolerance}); a slice may be missing"
        )
    return StackGeometry(order, spacing_z, origin, direction)
