"""NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``) into a :class:`Volume` in one canonical layout.

Canonical orientation. The data are reoriented with :mod:`nibabel.orientations` (a
permutation and flips only, no resampling) so that the voxel axes ``(i, j, k)`` point
as closely as possible to patient Left, Posterior, Superior, and then transposed to
``(k, j, i)``. So, for the returned ``array[z, y, x]``:

* axis 0 (z) runs inferior -> superior,
* axis 1 (y) runs anterior -> posterior,
* axis 2 (x) runs patient right -> patient left,

which is exactly the layout of an axial DICOM series with the usual orientation
``(1, 0, 0, 0, 1, 0)``, so the same scan read from NIfTI or DICOM gives the same array.
An axial slice ``array[z]`` displayed with row 0 at the top shows anterior at the top and
the patient's right on the viewer's left (radiological convention).

``spacing`` is ``(sz, sy, sx)``, the voxel sizes (zooms) along those axes in mm.
``origin`` and ``direction`` are in DICOM LPS coordinates: the NIfTI (RAS) affine with
its x and y rows negated. For an oblique scan the axes are only the closest to L, P, S;
``direction`` holds the exact vectors.

Values: ``scl_slope``/``scl_inter`` applied; int16 or uint16 when the stored data are
integers, the scaling is integral and the result fits, else float32.

4D images: an error unless ``volume_index`` picks one volume (a 4D image with a single
volume is read as 3D). Analyze/NIfTI pairs (``.hdr``/``.img``) are not supported.
Header text fields and extensions (which may hold identifiers) are never read into ``meta``.
"""

from __future__ import annotations

import io
import zlib

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from .errors import LimitExceededError, MedicalImageError
from .limits import ReadLimits
from .records import Volume
from .sources import Source, is_gzip, read_source

_HEADER_BYTES = {1: 348, 2: 540}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
#: bytes inflated per step of a streamed gunzip
_GUNZIP_PIECE = 4 << 20
#: elements scaled per step (bounds the float64 temporaries of ``_scale``)
_SCALE_PIECE = 1 << 20


def nifti_kind(header: bytes) -> int | None:
    """1 or 2 for an uncompressed NIfTI single-file header, else None."""
    if len(header) >= 348 and header[344:348] == b"n+1\x00":
        return 1
    if len(header) >= 540 and header[4:8] == b"n+2\x00":
        return 2
    return None


def _gunzip(data: bytes, max_bytes: int, name: str) -> bytes:
    """Inflate at most ``max_bytes`` of a gzip stream (a bomb stops there)."""
    try:
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, max_bytes)
    except zlib.error:
        raise MedicalImageError(f"{name}: corrupt gzip stream") from None


def _gunzip_into(data: bytes, nbytes: int, name: str) -> np.ndarray:
    """The first ``nbytes`` of a gzip stream, inflated piece by piece into one buffer.

    Memory is the ``nbytes`` the header declared (already checked against the limits)
    plus one piece: nothing past ``nbytes`` is ever inflated, and no intermediate bytes
    object of the whole stream is built. Returns a writable uint8 array of at most
    ``nbytes`` (fewer when the stream is shorter).
    """
    out = np.empty(nbytes, dtype=np.uint8)
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending, filled = data, 0
    try:
        while filled < nbytes:
            piece = inflater.decompress(pending, min(_GUNZIP_PIECE, nbytes - filled))
            if not piece and (inflater.eof or not inflater.unconsumed_tail):
                break
            out[filled:filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            filled += len(piece)
            pending = inflater.unconsumed_tail
    except zlib.error:
        raise MedicalImageError(f"{name}: corrupt gzip stream") from None
    return out[:filled]


def is_nifti(data: bytes, name: str = "<bytes>") -> bool:
    head = _gunzip(data, 548, name) if is_gzip(data) else data[:548]
    return nifti_kind(head) is not None


def read_nifti(
    source: Source,
    *,
    limits: ReadLimits | None = None,
    volume_index: int | None = None,
    name: str | None = None,
) -> Volume:
    """Read a NIfTI image from a path, bytes or binary file object.

    Parameters
    ----------
    source : str, os.PathLike, bytes-like or binary file-like
        ``.nii`` or ``.nii.gz`` content (recognised by content).
    limits : ReadLimits, optional
        The header shape is checked before the data are inflated or read.
    volume_index : int, optional
        Which volume of a 4D image to return (0-based).
    name : str, optional
        Label in error messages.

    Returns
    -------
    Volume
        ``array`` ``(D, H, W)`` in the canonical orientation of the module docstring.
    """
    limits = limits if limits is not None else ReadLimits()
    data, label = read_source(source, limits, name)
    compressed = is_gzip(data)
    head = _gunzip(data, 548, label) if compressed else data[:548]
    kind = nifti_kind(head)
    if kind is None:
        raise MedicalImageError(f"{label}: not a NIfTI-1/NIfTI-2 single-file image (no n+1/n+2 magic)")
    klass = nib.Nifti1Image if kind == 1 else nib.Nifti2Image
    try:
        # Only the fixed-size part: extensions (which may hold identifiers) are not parsed.
        header = klass.header_class.from_fileobj(io.BytesIO(head[: 348 if kind == 1 else 540]))
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header.get_data_offset())
    except Exception as exc:  # nibabel raises several types for bad headers
        raise MedicalImageError(f"{label}: corrupt NIfTI header ({type(exc).__name__})") from None
    volumes = _check_shape(shape, volume_index, label, limits)
    total = int(np.prod(shape[:3])) * volumes * itemsize
    limits.check_decoded_bytes(total, label)
    if offset < _HEADER_BYTES[kind]:
        raise MedicalImageError(f"{label}: NIfTI vox_offset {offset} points into the header")
    # Decoded bytes are costed from the header above; the data are then inflated straight
    # into one buffer (a .nii.gz) or viewed in the upload (a .nii), and viewed as the
    # array; the scaled result is the only other full-size allocation, so the peak is
    # about two decoded volumes whatever the input (nibabel's reader took seven).
    if compressed:
        raw_bytes = _gunzip_into(data, offset + total, label)[offset:]
    else:
        raw_bytes = np.frombuffer(data, dtype=np.uint8)[offset:offset + total]
    if raw_bytes.size < total:
        raise MedicalImageError(f"{label}: truncated NIfTI ({offset + raw_bytes.size} bytes, "
                                f"header needs {offset + total})")
    try:
        dtype = header.get_data_dtype()
        slope, inter = header.get_slope_inter()
        affine = header.get_best_affine()
    except Exception as exc:  # nibabel raises several types for bad headers
        raise MedicalImageError(f"{label}: unreadable NIfTI header "
                                f"({type(exc).__name__})") from None
    if dtype.fields is not None or dtype.kind not in "iuf":
        raise MedicalImageError(f"{label}: NIfTI data type {dtype} (complex/RGB) is not supported")
    full = (shape + (1, 1))[:3] + ((volumes,) if len(shape) >= 4 else ())
    raw = raw_bytes[:total].view(dtype).reshape(full, order="F")  # NIfTI stores x fastest
    if raw.ndim == 4:
        raw = raw[..., volume_index or 0]
    slope = 1.0 if slope is None else float(slope)
    inter = 0.0 if inter is None else float(inter)
    values = _scale(raw, slope, inter, label)
    del raw, raw_bytes  # the inflated buffer goes before the canonical copy is made
    return _canonical(values, affine, header, kind, label)


def _check_shape(shape: tuple[int, ...], volume_index: int | None, name: str, limits: ReadLimits) -> int:
    """Validate dimensions; returns the number of stored volumes."""
    if not shape or min(shape) < 1:
        raise MedicalImageError(f"{name}: NIfTI dimensions must all be >= 1, got {shape}")
    if len(shape) < 3:
        shape = shape + (1,) * (3 - len(shape))
    if len(shape) > 4 and any(s != 1 for s in shape[4:]):
        raise MedicalImageError(f"{name}: {len(shape)}-D NIfTI images are not supported (shape {shape})")
    volumes = shape[3] if len(shape) >= 4 else 1
    if volumes > 1 and volume_index is None:
        raise MedicalImageError(
            f"{name}: 4-D NIfTI with {volumes} volumes; pass volume_index= to pick one"
        )
    if volume_index is not None and not 0 <= volume_index < volumes:
        raise MedicalImageError(f"{name}: volume_index={volume_index} out of range for {volumes} volume(s)")
    nx, ny, nz = shape[:3]
    limits.check_volume(nz, ny, nx, name)
    if volumes * nx * ny * nz > limits.max_voxels:
        raise LimitExceededError(f"{name}: {volumes} volumes of {nx}x{ny}x{nz} exceeds "
                                 f"ReadLimits.max_voxels={limits.max_voxels}")
    return volumes


def _scale(raw: np.ndarray, slope: float, inter: float, name: str) -> np.ndarray:
    """``raw * slope + inter``: int16/uint16 when integral and in range, else float32.

    Works piece by piece along the last (slowest, NIfTI z) axis so the temporaries stay
    small: the result is the only full-size allocation.
    """
    if not (np.isfinite(slope) and np.isfinite(inter)):
        raise MedicalImageError(f"{name}: scl_slope/scl_inter not finite")
    if np.issubdtype(raw.dtype, np.integer) and slope == 1 and float(inter).is_integer():
        shift = int(inter)
        lo, hi = (int(raw.min()) + shift, int(raw.max()) + shift) if raw.size else (0, 0)
        for dtype in (np.int16, np.uint16):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return _map_pieces(raw, dtype, lambda p, s=shift: p.astype(np.int64) + s)
    return _map_pieces(raw, np.float32, lambda p: p.astype(np.float64) * slope + inter)


def _map_pieces(raw: np.ndarray, dtype, fn) -> np.ndarray:
    """``fn(raw).astype(dtype)`` computed over slabs of the last axis (F-ordered result)."""
    out = np.empty(raw.shape, dtype=dtype, order="F")
    plane = max(1, int(np.prod(raw.shape[:-1])))
    step = max(1, _SCALE_PIECE // plane)
    for k in range(0, raw.shape[-1], step):
        out[..., k:k + step] = fn(raw[..., k:k + step])
    return out


def _canonical(values: np.ndarray, affine: np.ndarray, header, kind: int, name: str) -> Volume:
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MedicalImageError(f"{name}: NIfTI affine is missing or singular")
    current = ornt.io_orientation(affine)
    if np.isnan(current).any():  # a voxel axis with no dominant world direction
        raise MedicalImageError(f"{name}: NIfTI affine has a voxel axis with no dominant direction")
    transform = ornt.ornt_transform(current, ornt.axcodes2ornt(("L", "P", "S")))
    data = ornt.apply_orientation(values, transform)
    new_affine = affine @ ornt.inv_ornt_aff(transform, values.shape)
    lps = _LPS_TO_RAS @ new_affine[:3, :3]  # the same diag matrix maps RAS to LPS
    columns = lps[:, ::-1]  # voxel axes (k, j, i) = array axes (z, y, x)
    spacing = np.linalg.norm(columns, axis=0)
    direction = (columns / spacing).T
    origin = _LPS_TO_RAS @ new_affine[:3, 3]
    array = np.ascontiguousarray(data.transpose(2, 1, 0))
    meta = {
        "format": f"NIfTI-{kind}",
        "original_axcodes": "".join(nib.aff2axcodes(affine)),
        "canonical_axcodes": "LPS",
        "qform_code": int(header["qform_code"]),
        "sform_code": int(header["sform_code"]),
    }
    return Volume(
        array=array,
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(v) for v in origin),
        direction=direction,
        meta=meta,
    )
