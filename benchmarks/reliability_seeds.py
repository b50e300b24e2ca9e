"""Seed corpus and mutators of the reliability fuzzer (``benchmarks/reliability.py``).

Seeds are real files: pydicom's test DICOMs (CT, MR, multi-frame MR, RLE, JPEG, JPEG 2000),
nibabel's NIfTI test files, a zip of a small CT series, PNG and JPEG images, report text,
and serialized protobuf requests. Mutators work on bytes (bit flips, byte sets, truncation,
splicing, insertion, repetition) or know a format (absurd DICOM attributes, NIfTI ``dim`` /
``pixdim`` / datatype, PNG ``IHDR`` with a valid CRC, zip members), and a few bombs are
built once: each declares far more pixels than it carries bytes.

Every draw takes a ``random.Random``: a case number and the run's seed fix the case.
"""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

#: pydicom test files used as seeds (all small; compressed ones exercise the decoders)
DICOM_SEEDS = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm",
               "SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm", "emri_small.dcm",
               "rtplan.dcm")
NIFTI_SEEDS = ("anatomical.nii", "functional.nii", "example_nifti2.nii.gz",
               "resampled_anat_moved.nii", "standard.nii.gz")
REPORTS = (
    "Large left pleural effusion with adjacent atelectasis.",
    "The heart is enlarged, consistent with cardiomegaly. No pneumothorax.",
    "Lungs are clear. No acute cardiopulmonary abnormality.",
    "Right apical pneumothorax, no effusion. Degenerative changes of the spine.",
    "FINDINGS: Mild bibasilar opacities. IMPRESSION: Atelectasis versus pneumonia.",
)
MIB = 1024 * 1024


def pydicom_file(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name)).read_bytes()


def nibabel_file(name: str) -> bytes:
    import nibabel

    return (Path(nibabel.__file__).parent / "tests" / "data" / name).read_bytes()


def png_bytes(size: int = 48, pattern: int = 0, mode: str = "L") -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    arr = ((xx * (pattern + 1) + yy * 3) % 256).astype(np.uint8)
    img = Image.fromarray(arr)
    if mode != "L":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: int = 48) -> bytes:
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    buf = io.BytesIO()
    Image.fromarray(((xx ^ yy) * 4 % 256).astype(np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def nifti_bytes(shape=(24, 24, 16), spacing=(2.0, 2.0, 2.0), seed: int = 0,
                gz: bool = False, dtype=np.float32) -> bytes:
    import nibabel as nib

    arr = np.random.default_rng(seed).normal(40, 80, size=shape).astype(dtype)
    data = nib.Nifti1Image(arr, affine=np.diag([*spacing, 1.0])).to_bytes()
    return gzip.compress(data, 1) if gz else data


def edit_dicom(data: bytes, **attrs) -> bytes:
    """``data`` (DICOM bytes) with attributes set (None deletes), written without
    validation so that absurd values survive."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    settings = pydicom.config.settings
    modes = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        for key, value in attrs.items():
            if key == "TransferSyntaxUID":
                ds.file_meta.TransferSyntaxUID = value
            elif value is None:
                if key in ds:
                    delattr(ds, key)
            else:
                setattr(ds, key, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=False)
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = modes
    return buf.getvalue()


def dicom_series_zip(base: bytes, n: int = 4, phi: dict | None = None) -> bytes:
    """A zip of ``n`` slices of one series made from one real slice (positions 1.25 mm
    apart, own SOP Instance UIDs), with ``phi`` attributes set on every slice."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            attrs = dict(phi or {})
            attrs.update(InstanceNumber=i + 1, ImagePositionPatient=[0.0, 0.0, 1.25 * i],
                         ImageOrientationPatient=[1, 0, 0, 0, 1, 0],
                         SOPInstanceUID=f"1.2.826.0.1.3680043.8.498.{7000 + i}")
            z.writestr(f"series/slice{i:03d}.dcm", edit_dicom(base, **attrs))
    return buf.getvalue()


def _zip_of(members: list[tuple[str, bytes]], method=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height 8-bit grey, with a small zlib stream
    of zero rows (a decompression bomb when the header is believed)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)
    data = b"".join(comp.compress(row) for _ in range(min(height, 4096))) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data)
            + _png_chunk(b"IEND", b""))


def nifti_gz_bomb(shape=(512, 512, 1024)) -> bytes:
    """A gzip'd NIfTI declaring ``shape`` int16, of zeros: ~0.5 GiB inflated from ~0.5 MiB."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    head = hdr.binaryblock + b"\x00" * 4
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    out = [comp.compress(head)]
    zeros = b"\x00" * MIB
    for _ in range(int(np.prod(shape)) * 2 // MIB):
        out.append(comp.compress(zeros))
    out.append(comp.flush())
    return b"".join(out)


def build_seeds() -> dict[str, dict[str, bytes]]:
    """``{kind: {name: bytes}}`` with kinds image, volume, text, bomb."""
    dicoms = {n: pydicom_file(n) for n in DICOM_SEEDS}
    ct = dicoms["CT_small.dcm"]
    image = {n: d for n, d in dicoms.items() if n not in ("emri_small.dcm",)}
    image.update({"png-grey": png_bytes(48), "png-rgb": png_bytes(40, 2, "RGB"),
                  "png-16bit": png_bytes(32, 1, "I;16"), "jpeg": jpeg_bytes(48),
                  "png-big": png_bytes(512, 3)})
    volume = {n: nibabel_file(n) for n in NIFTI_SEEDS}
    volume.update({"emri_small.dcm": dicoms["emri_small.dcm"],
                   "emri_small_jpeg_2k_lossless.dcm":
                       pydicom_file("emri_small_jpeg_2k_lossless.dcm"),
                   "ct-series.zip": dicom_series_zip(ct, 4),
                   "nifti-synth": nifti_bytes(),
                   "nifti-synth.gz": nifti_bytes((20, 28, 12), (3.0, 1.5, 1.0), 1, gz=True)})
    text = {f"report-{i}": r.encode() for i, r in enumerate(REPORTS)}
    bomb = {
        "png-65535x65535": png_bomb(65535, 65535),
        "png-1x2e9": png_bomb(1, 2_000_000_000),
        "nii.gz-512x512x1024": nifti_gz_bomb(),
        "zip-64MiB-zeros": _zip_of([("a.dcm", b"\x00" * (64 * MIB))]),
        "zip-30000-members": _zip_of([(f"m{i}.dcm", b"") for i in range(30000)],
                                     zipfile.ZIP_STORED),
        "zip-nested": _zip_of([("inner.zip", _zip_of([("x.dcm", ct)] * 1))]),
        "zip-traversal": _zip_of([("../../etc/passwd.dcm", ct), ("/abs/x.dcm", ct)]),
        "zip-mixed-series": _zip_of([("a.dcm", ct), ("b.dcm", dicoms["MR_small.dcm"])]),
        "zip-empty": _zip_of([]),
        "dicom-rows-65535": edit_dicom(ct, Rows=65535, Columns=65535),
        "dicom-frames-1e6": edit_dicom(dicoms["emri_small.dcm"], NumberOfFrames="1000000"),
    }
    return {"image": image, "volume": volume, "text": text, "bomb": bomb}


# -- byte-level mutations ----------------------------------------------------------------
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE)


def bitflip(rng, data: bytes) -> bytes:
    if not data:
        return b"\x01"
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def byteset(rng, data: bytes) -> bytes:
    if not data:
        return bytes([rng.choice(INTERESTING_BYTES)])
    buf = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        buf[rng.randrange(len(buf))] = rng.choice(INTERESTING_BYTES)
    return bytes(buf)


def truncate(rng, data: bytes) -> bytes:
    return data[:rng.randrange(max(1, len(data)))]


def insert(rng, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    chunk = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    return data[:i] + chunk + data[i:]


def repeat(rng, data: bytes) -> bytes:
    if len(data) < 2:
        return data * 2
    i = rng.randrange(len(data) - 1)
    j = min(len(data), i + rng.randint(1, 4096))
    return data[:j] + data[i:j] * rng.randint(1, 8) + data[j:]


def splice(rng, data: bytes, other: bytes) -> bytes:
    return data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]


BYTE_MUTATIONS = {"bitflip": bitflip, "byteset": byteset, "truncate": truncate,
                  "insert": insert, "repeat": repeat}

# -- format-aware mutations ----------------------------------------------------------------
ABSURD_DICOM = {
    "Rows": (0, 1, 3, 65535), "Columns": (0, 1, 65535),
    "NumberOfFrames": ("0", "-1", "2", "99999"), "BitsAllocated": (0, 1, 7, 12, 64),
    "BitsStored": (0, 1, 17, 64), "HighBit": (0, 31, 255),
    "SamplesPerPixel": (0, 2, 3, 4, 255), "PixelRepresentation": (1, 2, 255),
    "PhotometricInterpretation": ("PALETTE COLOR", "YBR_FULL", "RGB", "XYZ", ""),
    "PixelSpacing": ([0, 0], [-1, 1], [1e30, 1e30], ["nan", "nan"], ["inf", "1"], [1e-30, 1e-30]),
    "SliceThickness": ("0", "-5", "nan", "1e300"), "SpacingBetweenSlices": ("0", "-1", "inf"),
    "RescaleSlope": ("0", "nan", "1e308", "-1e308"), "RescaleIntercept": ("nan", "1e308"),
    "WindowCenter": ("nan", "1e308"), "WindowWidth": ("0", "-1", "nan"),
    "ImagePositionPatient": ([0, 0, "nan"], [1e308, 1e308, 1e308]),
    "ImageOrientationPatient": ([0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], ["nan"] * 6),
    "PlanarConfiguration": (1, 7), "Modality": ("", "X" * 64),
    "TransferSyntaxUID": ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.5",
                          "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.90", "1.2.3"),
    "PixelData": (None, b"", b"\x00\x01"),
}


def dicom_header(rng, data: bytes) -> bytes:
    """One to three attributes of a DICOM set to absurd values."""
    picks = rng.sample(sorted(ABSURD_DICOM), rng.randint(1, 3))
    values = {k: rng.choice(ABSURD_DICOM[k]) for k in picks}
    try:
        return edit_dicom(data, **values)
    except Exception:  # noqa: BLE001 - pydicom will not write this combination: bytes
        return bitflip(rng, data)


_NIFTI_INTS = (0, -1, 1, 2, 7, 8, 255, 32767, -32768)
_NIFTI_FLOATS = (0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, 1e-3, 1000.0)


def nifti_header(rng, data: bytes) -> bytes:
    """A NIfTI-1 header field (dim, pixdim, datatype, bitpix, vox_offset, scl_slope,
    qform/sform codes and srow) set to an absurd value; gzip'd input stays gzip'd."""
    gz = data[:2] == b"\x1f\x8b"
    raw = bytearray(gzip.decompress(data) if gz else data)
    if len(raw) < 348:
        return bitflip(rng, data)
    field = rng.choice(("dim", "pixdim", "datatype", "bitpix", "vox_offset", "scl", "code",
                        "srow"))
    if field == "dim":
        struct.pack_into("<h", raw, 40 + 2 * rng.randrange(8), rng.choice(_NIFTI_INTS))
    elif field == "pixdim":
        struct.pack_into("<f", raw, 76 + 4 * rng.randrange(8), rng.choice(_NIFTI_FLOATS))
    elif field == "datatype":
        struct.pack_into("<h", raw, 70, rng.choice((0, 1, 2, 4, 16, 32, 128, 511, 1792, 2304)))
    elif field == "bitpix":
        struct.pack_into("<h", raw, 72, rng.choice(_NIFTI_INTS))
    elif field == "vox_offset":
        struct.pack_into("<f", raw, 108, rng.choice((0.0, -352.0, 1e9, float("nan"), 351.0)))
    elif field == "scl":
        struct.pack_into("<ff", raw, 112, rng.choice(_NIFTI_FLOATS), rng.choice(_NIFTI_FLOATS))
    elif field == "code":
        struct.pack_into("<hh", raw, 252, rng.choice((0, 1, 4, 99)), rng.choice((0, 2, 99)))
    else:
        struct.pack_into("<f", raw, 280 + 4 * rng.randrange(12), rng.choice(_NIFTI_FLOATS))
    return gzip.compress(bytes(raw), 1) if gz else bytes(raw)


def png_header(rng, data: bytes) -> bytes:
    """PNG IHDR width, height, bit depth or colour type changed, CRC recomputed (so the
    decoder believes it)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 33:
        return bitflip(rng, data)
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    choice = rng.randrange(4)
    if choice == 0:
        w = rng.choice((0, 1, 65535, 2**31 - 1, w * 64))
    elif choice == 1:
        h = rng.choice((0, 1, 65535, 2**31 - 1, h * 64))
    elif choice == 2:
        depth = rng.choice((0, 1, 3, 16, 255))
    else:
        colour = rng.choice((1, 2, 3, 4, 6, 7, 255))
    body = struct.pack(">IIBB", w, h, depth, colour) + data[26:29]
    return data[:12] + body[:13] + struct.pack(">I", zlib.crc32(b"IHDR" + body[:13])) + data[33:]


def zip_members(rng, data: bytes) -> bytes:
    """A zip's members mutated one by one (a DICOM header change or byte mutation),
    renamed, dropped or duplicated, and re-zipped."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(i.filename, z.read(i)) for i in z.infolist()]
    except Exception:  # noqa: BLE001 - a mutated archive: fall back to bytes
        return bitflip(rng, data)
    if not members:
        return data
    out = []
    for name, body in members:
        r = rng.random()
        if r < 0.2:
            body = dicom_header(rng, body) if body[128:132] == b"DICM" else bitflip(rng, body)
        elif r < 0.3:
            body = truncate(rng, body)
        elif r < 0.35:
            continue
        elif r < 0.4:
            out.append((name + ".dup", body))
        elif r < 0.45:
            name = rng.choice(("noext", "/", "../x.dcm", "a" * 300, "dir/", ".dcm"))
        out.append((name, body))
    return _zip_of(out, rng.choice((zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)))


def mutate_bytes(rng, data: bytes, pool: list[bytes]) -> tuple[str, bytes]:
    """``(mutation name, mutated bytes)`` of ``data``; ``pool`` gives splice partners."""
    r = rng.random()
    if r < 0.04:
        return "none", data
    if r < 0.34:
        if data[128:132] == b"DICM":
            return "dicom-header", dicom_header(rng, data)
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "png-header", png_header(rng, data)
        if data[:4] == b"PK\x03\x04":
            return "zip-members", zip_members(rng, data)
        if len(data) >= 348 and (data[344:348] in (b"n+1\x00", b"ni1\x00")
                                 or data[:2] == b"\x1f\x8b"):
            return "nifti-header", nifti_header(rng, data)
    if r < 0.44:
        return "splice", splice(rng, data, rng.choice(pool))
    name = rng.choice(sorted(BYTE_MUTATIONS))
    out = BYTE_MUTATIONS[name](rng, data)
    if rng.random() < 0.15:  # stacked mutations reach deeper states
        name2 = rng.choice(sorted(BYTE_MUTATIONS))
        out, name = BYTE_MUTATIONS[name2](rng, out), f"{name}+{name2}"
    return name, out


WEIRD_TEXT = ("", " ", "\t\n", "\x00", "a\x00b", "\u202e\u0646\u0635", "\U0001F600" * 100,
              "\u0301" * 50, "x" * 40000, "effusion " * 5000, "\ufeff", "\ud7ff\ue000",
              "NULL", "'; DROP TABLE items; --", "%s%n%x", "../../../../etc/passwd")


def mutate_text(rng, data: bytes, pool: list[bytes]) -> tuple[str, str]:
    if rng.random() < 0.25:
        return "weird-text", rng.choice(WEIRD_TEXT)
    name, out = mutate_bytes(rng, data, pool)
    return name, out.decode("utf-8", "replace")
