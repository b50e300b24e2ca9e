"""DICOM as a PACS exports it (``medseek.io.dicom_groups``) on real files: pydicom's and
pydicom-data's test files, and series built from a real CT slice (new SOP Instance UIDs,
positions along z, instance numbers), extension-less, bare (no preamble), zipped, on a
DICOMDIR medium written by pydicom's ``FileSet``; then ``medseek ingest`` of a series
folder through the real gRPC server."""

from __future__ import annotations

import copy
import gc
import io
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from medseek.io import LimitExceededError, MedicalImageError, ReadLimits, read_image, read_volume
from medseek.io.dicom_groups import DicomGrouping, discover, group_dicom, is_dicom_source

STEP_MM = 2.5


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed (pydicom-data)")
    return Path(path)


@pytest.fixture(scope="module")
def ct_slice() -> pydicom.Dataset:
    return pydicom.dcmread(_testdata("CT_small.dcm"))


def make_series(folder: Path, src: pydicom.Dataset, n: int, *, study: str | None = None,
                names=None, bare: bool = False) -> tuple[str, list[Path]]:
    """Write ``n`` slices of one new series built from ``src``: slice ``z`` (0 = lowest)
    at ``z * STEP_MM`` above ``src`` with pixels ``src + 10 z`` (so order shows in the
    voxels), file names from ``names(z)`` (default: reversed, extension-less ``IMxxxx``).
    ``bare``: no preamble and no file meta (a data set as old PACS exports write it)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    names = names or (lambda z: f"IM{n - 1 - z:04d}")
    base = np.asarray(src.ImagePositionPatient, dtype=float)
    paths = []
    for z in range(n):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series
        if study is not None:
            ds.StudyInstanceUID = study
        ds.ImagePositionPatient = [float(base[0]), float(base[1]), float(base[2] + STEP_MM * z)]
        ds.InstanceNumber = z + 1
        ds.PixelData = (src.pixel_array + 10 * z).astype(src.pixel_array.dtype).tobytes()
        path = folder / names(z)
        if bare:
            del ds.file_meta
            ds.preamble = None
            pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        else:
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return series, paths


def _variant(src: pydicom.Dataset, path: Path, **changes) -> Path:
    ds = copy.deepcopy(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_medium(paths, dest: Path) -> None:
    """A DICOMDIR medium of ``paths`` at ``dest``, written by pydicom's ``FileSet``."""
    from pydicom.fileset import FileSet

    fileset = FileSet()
    for path in paths:
        fileset.add(path)
    fileset.write(dest)
    with warnings.catch_warnings():  # FileSet never removes its staging directory: done here
        warnings.simplefilter("ignore", ResourceWarning)
        del fileset
        gc.collect()


def _mean_per_slice(payload: bytes) -> np.ndarray:
    vol = read_volume(payload)
    return vol.array.reshape(vol.array.shape[0], -1).mean(axis=1)


def test_series_folder_without_extensions_is_one_volume_sorted_by_position(tmp_path, ct_slice):
    series, _ = make_series(tmp_path / "export" / "S1", ct_slice, 5)
    shutil.copy(_testdata("RG1_UNCR.dcm"), tmp_path / "export" / "cr")  # a chest CR
    grouping = discover(tmp_path / "export")
    kinds = sorted((i.kind, i.modality, i.n_files) for i in grouping.items)
    assert kinds == [("image", "CR", 1), ("volume", "CT", 5)]
    volume = next(i for i in grouping.items if i.kind == "volume")
    assert volume.series_uid == series
    # files were named in reverse: IM0004 is the lowest slice
    assert volume.names == [f"S1/IM{k:04d}" for k in (4, 3, 2, 1, 0)]
    positions = [float(pydicom.dcmread(io.BytesIO(b)).ImagePositionPatient[2])
                 for _, b in volume.files]
    assert np.all(np.diff(positions) == pytest.approx(STEP_MM))
    vol = read_volume(volume.payload())  # what the server reads: a zip of the slices
    assert vol.array.shape == (5, 128, 128) and vol.spacing[0] == pytest.approx(STEP_MM)
    assert np.diff(_mean_per_slice(volume.payload())) == pytest.approx(np.full(4, 10.0))
    cr = next(i for i in grouping.items if i.kind == "image")
    assert cr.payload() == _testdata("RG1_UNCR.dcm").read_bytes()
    assert grouping.skipped == [] and grouping.others == []


def test_item_ids_are_stable_hashes_never_the_uids(tmp_path, ct_slice):
    study = generate_uid()
    s1, _ = make_series(tmp_path / "a", ct_slice, 3, study=study)
    s2, _ = make_series(tmp_path / "b", ct_slice, 4, study=study)
    first, again = discover(tmp_path), discover(tmp_path)
    assert [i.item_id for i in first.items] == [i.item_id for i in again.items]
    assert len({i.item_id for i in first.items}) == 2
    assert {i.study_uid for i in first.items} == {study}  # two series, one study
    assert {i.series_uid for i in first.items} == {s1, s2}
    for item in first.items:
        assert item.item_id.startswith("ct-")
        for uid in (study, s1, s2):
            assert uid not in item.item_id and uid not in repr(item)


def test_localizer_secondary_capture_and_non_images_are_skipped_with_reasons(tmp_path, ct_slice):
    series, _ = make_series(tmp_path, ct_slice, 3)
    # a localizer inside the axial series (as some scanners store it), another by description
    _variant(ct_slice, tmp_path / "scout", SeriesInstanceUID=series,
             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], InstanceNumber=99)
    _variant(ct_slice, tmp_path / "topo", SeriesInstanceUID=generate_uid(),
             SeriesDescription="Topogram 0.6 T20f")
    _variant(ct_slice, tmp_path / "nopixels", SeriesInstanceUID=generate_uid(), PixelData=None)
    shutil.copy(_testdata("SC_rgb.dcm"), tmp_path / "capture")
    shutil.copy(_testdata("rtplan.dcm"), tmp_path / "plan")
    shutil.copy(_testdata("liver.dcm"), tmp_path / "seg")
    shutil.copy(_testdata("image_dfl.dcm"), tmp_path / "deflated")
    shutil.copy(_testdata("no_meta.dcm"), tmp_path / "junk")  # no DICM, no group 0008 first
    (tmp_path / "notes.txt").write_text("not DICOM")
    grouping = discover(tmp_path)
    assert [(i.kind, i.n_files) for i in grouping.items] == [("volume", 3)]
    reasons = {s.name: s.reason for s in grouping.skipped}
    assert reasons == {
        "scout": "localizer (ImageType contains LOCALIZER)",
        "topo": "localizer (series description says 'topogram')",
        "nopixels": "no Pixel Data (not an image)",
        "capture": "secondary capture (SOP Class Secondary Capture Image Storage)",
        "plan": "non-image object: RT plan (modality RTPLAN)",
        "seg": "non-image object: segmentation (modality SEG)",
        "deflated": "deflated transfer syntax is not read (its data set would be inflated "
                    "whole, before any size check)",
    }
    assert grouping.others == ["junk", "notes.txt"]


def test_multiframe_file_is_a_volume_and_radiographs_images(tmp_path):
    for name in ("emri_small.dcm", "RG1_UNCR.dcm", "RG3_UNCR.dcm"):
        shutil.copy(_testdata(name), tmp_path / name.removesuffix(".dcm").lower())
    grouping = discover(tmp_path)
    got = {i.names[0]: (i.kind, i.modality) for i in grouping.items}
    assert got == {"emri_small": ("volume", "MR"), "rg1_uncr": ("image", "CR"),
                   "rg3_uncr": ("image", "CR")}
    mf = next(i for i in grouping.items if i.kind == "volume")
    assert mf.payload() == _testdata("emri_small.dcm").read_bytes()  # the file itself
    assert read_volume(mf.payload()).array.shape[0] == 10
    # two radiographs of one series (they share pydicom's test Series UID): two images
    assert len({i.item_id for i in grouping.items}) == 3


def test_copies_and_slices_at_one_position_are_skipped(tmp_path):
    """pydicom-data's 693 CT head: one slice stored uncompressed (UNCR) and as JPEG 2000
    (J2KR) is one SOP instance twice; UNCI is another instance at the same position."""
    for name, new in (("693_UNCR.dcm", "a_uncr"), ("693_J2KR.dcm", "b_j2kr"),
                      ("693_UNCI.dcm", "c_unci")):
        shutil.copy(_testdata(name), tmp_path / new)
    grouping = discover(tmp_path)
    assert [(i.kind, i.modality, i.names) for i in grouping.items] == [
        ("image", "CT", ["a_uncr"])]  # a lone slice left: an image
    assert [(s.name, s.reason) for s in grouping.skipped] == [
        ("b_j2kr", "another copy of the object in a_uncr"),
        ("c_unci", "duplicate slice: same position as a_uncr")]
    assert read_image(grouping.items[0].payload()).pixels.shape == (512, 512)


def test_bare_data_sets_are_dicom_and_sent_as_part10(tmp_path, ct_slice):
    make_series(tmp_path, ct_slice, 4, bare=True)
    assert (tmp_path / "IM0000").read_bytes()[128:132] != b"DICM"
    grouping = discover(tmp_path)
    (volume,) = grouping.items
    assert volume.kind == "volume" and volume.n_files == 4
    with zipfile.ZipFile(io.BytesIO(volume.payload())) as archive:
        members = [archive.read(n) for n in archive.namelist()]
    assert all(m[128:132] == b"DICM" for m in members)
    assert np.diff(_mean_per_slice(volume.payload())) == pytest.approx(np.full(3, 10.0))
    # one bare slice on its own is an image the 2D reader takes
    (single,) = group_dicom([("one", (tmp_path / "IM0000").read_bytes())]).items
    assert single.kind == "image"
    assert read_image(single.payload()).pixels.shape == (128, 128)


def test_zip_of_a_series_is_one_volume(tmp_path, ct_slice):
    make_series(tmp_path / "series", ct_slice, 4)
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted((tmp_path / "series").iterdir()):
            zf.write(path, f"DICOM/{path.name}")
        zf.writestr("README", "exported by a PACS")
    assert is_dicom_source(archive)
    grouping = discover(archive)
    (volume,) = grouping.items
    assert volume.names == [f"DICOM/IM{k:04d}" for k in (3, 2, 1, 0)]
    assert grouping.others == ["README"]
    assert read_volume(volume.payload()).array.shape == (4, 128, 128)


def test_dicomdir_medium_written_by_fileset(tmp_path, ct_slice):
    _, paths = make_series(tmp_path / "src", ct_slice, 3)
    medium = tmp_path / "medium"
    write_medium([*paths, _testdata("RG1_UNCR.dcm")], medium)
    by_dicomdir = discover(medium / "DICOMDIR")
    assert sorted((i.kind, i.modality, i.n_files) for i in by_dicomdir.items) == [
        ("image", "CR", 1), ("volume", "CT", 3)]
    assert all("/" in n and "." not in n for i in by_dicomdir.items for n in i.names)
    by_folder = discover(medium)  # the folder walk finds the same, and skips the DICOMDIR
    assert {i.item_id for i in by_folder.items} == {i.item_id for i in by_dicomdir.items}
    assert [(s.name, s.reason) for s in by_folder.skipped] == [
        ("DICOMDIR", "DICOMDIR (media directory, not an image)")]


def test_limits_bound_folders_files_and_series(tmp_path, ct_slice):
    make_series(tmp_path, ct_slice, 4)
    with pytest.raises(LimitExceededError, match="max_zip_members=3"):
        discover(tmp_path, limits=ReadLimits(max_zip_members=3))
    grouping = discover(tmp_path, limits=ReadLimits(max_slices=3))
    assert grouping.items == []
    assert {s.reason for s in grouping.skipped} == {
        "4 slices/frames exceeds ReadLimits.max_slices=3"}
    small = discover(tmp_path, limits=ReadLimits(max_file_bytes=1000))
    assert len(small.skipped) == 4 and all("ReadLimits.max_file_bytes=1000" in s.reason
                                          for s in small.skipped)
    with pytest.raises(MedicalImageError, match="not a folder, zip archive, DICOMDIR"):
        (tmp_path / "x.txt").write_text("hello")
        discover(tmp_path / "x.txt")


def test_group_dicom_takes_loaders_and_reads_them_lazily(tmp_path, ct_slice):
    _, paths = make_series(tmp_path, ct_slice, 3)
    calls = []

    def loader(path):
        def load():
            calls.append(path.name)
            return path.read_bytes()
        return load

    grouping = group_dicom([(p.name, loader(p)) for p in paths])
    assert isinstance(grouping, DicomGrouping) and len(calls) == 3  # headers only
    (volume,) = grouping.items
    volume.payload()
    assert len(calls) == 6  # the bytes again, when asked for


# -- the ingest CLI through the real gRPC server --------------------------------------

def test_ingest_series_folder_is_one_volume_item(tmp_path, ct_slice, capsys):
    pytest.importorskip("grpc_health")
    from medseek.io import DeidConfig
    from medseek.serve.commands import main
    from medseek.serve.ingest_sources import iter_items
    from medseek.serve.config import ServeConfig
    from medseek.serve.local_encoder import LocalTorchEncoder
    from medseek.serve.server import ServerThread

    folder = tmp_path / "PACS"
    series, _ = make_series(folder / "S1", ct_slice, 6)
    _variant(ct_slice, folder / "S1" / "scout", SeriesInstanceUID=series,
             ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    (folder / "S1" / "report.bin").write_bytes(b"\x00not dicom")
    token_file = tmp_path / "token"
    token_file.write_text("dicom-token-0123456789\n")
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      tokens=("dicom-token-0123456789",), grace_s=1.0,
                      deid=DeidConfig.development())
    with ServerThread(cfg, LocalTorchEncoder()) as s:
        common = ["--server", f"127.0.0.1:{s.port}", "--token-file", str(token_file)]
        assert main(["ingest", str(folder), *common, "--collection", "image"]) == 0
        out, err = capsys.readouterr()
        assert "1 inserted, 0 updated, 0 duplicates, 0 failed" in out
        assert "skipped S1/scout: localizer (ImageType contains LOCALIZER)" in err
        assert "dicom: 1 volume(s), 0 image(s) from 6 files; 1 skipped" in err
        assert series not in out + err
        (item_id,) = [i.id for i in iter_items(folder)]
        from medseek.serve.client import RetrievalClient

        with RetrievalClient(f"127.0.0.1:{s.port}", token="dicom-token-0123456789") as client:
            stats = {c.name: c.items for c in client.stats().collections}
            (stored,) = client.get([item_id]).items
        assert stats.get("volume") == 1 and "image" not in stats
        assert (stored.collection, stored.modality) == ("volume", "CT")


def test_ingest_takes_a_zip_or_dicomdir_given_directly(tmp_path, ct_slice):
    from medseek.serve.ingest_sources import iter_items

    _, paths = make_series(tmp_path / "s", ct_slice, 3)
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in paths:
            zf.write(path, path.name)
    (item,) = list(iter_items(archive))
    assert item.WhichOneof("content") == "volume" and item.collection == ""
    write_medium(paths, tmp_path / "cd")
    (from_cd,) = list(iter_items(tmp_path / "cd" / "DICOMDIR"))
    assert from_cd.id == item.id and from_cd.WhichOneof("content") == "volume"
