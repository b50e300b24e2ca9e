"""Request budgets and id rules against a real server (port 0, real encoder, SQLite, FAISS).

Each bomb is crafted for real and passed the limits the server had before it was costed:
a few-hundred-byte NIfTI declaring an absurd voxel spacing, a zip of many small members
that each inflate a thousand-fold, a .nii.gz of zeros, a 20 MiB text, a Get of 300k
repeated ids. Each must be refused before its work starts, with a status and a message
naming the budget and its value, without the memory it asks for (traced with
``tracemalloc``: the server runs in this process), and the server must keep answering.
No assertion depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import io
import math
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
import nibabel as nib  # noqa: E402

from medseek.io import DeidConfig  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import SERVE_LIMITS, RequestBudget, ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

from test_serve_api import nifti_bytes, png_bytes  # noqa: E402

MIB = 1024 * 1024
BUDGET = RequestBudget()


class RecordingEncoder:
    """A real encoder that remembers the longest text it was asked to encode."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.longest_text = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def encode_texts(self, texts):
        self.longest_text = max([self.longest_text, *(len(t.encode()) for t in texts)])
        return self._inner.encode_texts(texts)


@pytest.fixture(scope="module")
def encoder():
    return RecordingEncoder(LocalTorchEncoder(seed=0))


@pytest.fixture(scope="module")
def server(tmp_path_factory, encoder):
    d = tmp_path_factory.mktemp("budgets")
    # a de-identification key, so that zip archives reach the archive reader; joint: report
    # text goes through the recording encoder
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      deid=DeidConfig.development(), report_ranker="joint")
    with ServerThread(cfg, encoder) as s:
        with RetrievalClient(f"127.0.0.1:{s.port}") as c:
            c.ingest([pb.IngestItem(id="keep-img", image=png_bytes("circle"), regions=[
                          pb.Region(name="centre", box=pb.Box(x0=8, y0=8, x1=40, y1=40))]),
                      pb.IngestItem(id="keep-txt", text="Right pleural effusion.")])
        yield s


@pytest.fixture
def client(server):
    with RetrievalClient(f"127.0.0.1:{server.port}") as c:
        yield c


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


STORED = {"image": 1, "region": 1, "report": 1}


def _still_serving_and_intact(client) -> None:
    assert client.search(pb.SearchRequest(image=png_bytes("circle"), k=1)).hits[0].id == "keep-img"
    assert client.search(pb.SearchRequest(text="pleural effusion", k=1)).hits[0].id == "keep-txt"
    assert {c.name: c.items for c in client.stats().collections} == STORED


@contextlib.contextmanager
def traced():
    """``peak`` (bytes) of the Python and NumPy allocations of every thread meanwhile."""
    out = {}
    tracemalloc.start()
    try:
        yield out
    finally:
        out["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


# -- the bombs ---------------------------------------------------------------------------
def spacing_bomb(zoom: float) -> bytes:
    """A 4x4x4 NIfTI (480 bytes) whose voxels claim to be ``zoom`` mm wide."""
    affine = np.diag([zoom, zoom, zoom, 1.0])
    return nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine).to_bytes()


def gzip_nifti(shape: tuple[int, int, int]) -> bytes:
    """A real .nii.gz of int16 zeros of ``shape`` (x, y, z), compressed piece by piece (a
    few hundred bytes per MiB)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_zooms((1.0, 1.0, 1.0))
    hdr.set_data_offset(352)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts, zeros = [gz.compress(hdr.binaryblock + bytes(4))], bytes(MIB)
    nbytes = math.prod(shape) * 2
    parts += [gz.compress(zeros) for _ in range(nbytes // MIB)]
    parts += [gz.compress(bytes(nbytes % MIB)), gz.flush()]
    return b"".join(parts)


def zip_bomb(members: int) -> bytes:
    """A zip of ``members`` members of 1 MiB of zeros each: no member is over the 1 MiB
    from which a member's own ratio is checked, each inflates ~1000-fold."""
    buf = io.BytesIO()
    zeros = bytes(MIB)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for i in range(members):
            z.writestr(f"series/IM{i:04d}.dcm", zeros)
    return buf.getvalue()


# -- resource bombs ------------------------------------------------------------------------
def test_absurd_voxel_spacing_is_refused_before_resampling(server, client):
    target = server.server.service.config.preprocess.target_spacing
    bomb = spacing_bomb(128 * float(target))  # resamples to 512^3 voxels: 512 MiB of float32
    assert len(bomb) < 1000
    with traced() as mem:
        code, details = _code(lambda: client.search(pb.SearchRequest(volume=bomb)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("volume")
    assert f"RequestBudget.max_resampled_voxels={BUDGET.max_resampled_voxels}" in details
    assert mem["peak"] < 32 * MIB, mem
    code, details = _code(lambda: client.ingest([pb.IngestItem(id="bomb", volume=bomb)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "items[0].volume" in details
    assert "max_resampled_voxels" in details
    _still_serving_and_intact(client)


def test_a_volume_within_the_budget_is_still_served(client):
    # the ordinary path is not refused: a 32 x 32 x 24 volume at 2 mm
    assert client.search(pb.SearchRequest(volume=nifti_bytes(3), k=1)).candidates >= 0


def test_zip_of_many_small_bomb_members_is_refused_before_inflating(client):
    bomb = zip_bomb(200)  # 200 MiB declared, under the archive's total limit
    assert len(bomb) < 4 * MIB and 200 * MIB < SERVE_LIMITS.max_zip_uncompressed_bytes
    with traced() as mem:
        code, details = _code(lambda: client.search(pb.SearchRequest(volume=bomb)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"ReadLimits.max_zip_ratio={SERVE_LIMITS.max_zip_ratio}" in details
    assert "all members" in details
    assert mem["peak"] < 32 * MIB, mem
    _still_serving_and_intact(client)


def test_zip_declaring_more_than_the_budget_is_refused(client):
    code, details = _code(lambda: client.search(pb.SearchRequest(volume=zip_bomb(300))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (f"ReadLimits.max_zip_uncompressed_bytes={SERVE_LIMITS.max_zip_uncompressed_bytes}"
            in details)


def test_gzip_nifti_over_the_decoded_budget_is_refused_before_inflating(client):
    bomb = gzip_nifti((1024, 1024, 256))  # 512 MiB of int16 in ~0.5 MB
    assert len(bomb) < 2 * MIB
    with traced() as mem:
        code, details = _code(lambda: client.search(pb.SearchRequest(volume=bomb)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"ReadLimits.max_voxels={SERVE_LIMITS.max_voxels}" in details
    assert mem["peak"] < 32 * MIB, mem
    _still_serving_and_intact(client)


def test_gzip_nifti_within_the_budget_costs_about_two_volumes(client):
    # 64 MiB of zeros in 65 kB: served, and read at about 2x its decoded size (the
    # reader before this took 7x: inflated bytes, nibabel's copy, int64 scaling, ...)
    bomb = gzip_nifti((256, 256, 512))
    with traced() as mem:
        client.search(pb.SearchRequest(volume=bomb, k=1))
    assert mem["peak"] < 3 * 64 * MIB, mem
    _still_serving_and_intact(client)


def test_huge_text_is_refused_before_the_encoder(client, encoder):
    huge = "no acute findings. " * (20 * MIB // 19)
    code, details = _code(lambda: client.search(pb.SearchRequest(text=huge)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("text")
    assert f"RequestBudget.max_text_bytes={BUDGET.max_text_bytes}" in details
    code, details = _code(lambda: client.ingest([pb.IngestItem(id="huge", text=huge)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "items[0].text" in details
    assert encoder.longest_text <= BUDGET.max_text_bytes
    long_report = "Small left pleural effusion. " * (BUDGET.max_text_bytes // 40)
    assert client.search(pb.SearchRequest(text=long_report, k=1)).hits  # within: served
    _still_serving_and_intact(client)


def test_get_of_many_repeated_ids_is_refused_and_repeats_are_answered_once(client):
    code, details = _code(lambda: client.get(["keep-img"] * 300_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"300000 ids exceeds RequestBudget.max_ids={BUDGET.max_ids}" in details
    code, details = _code(lambda: client.delete(["keep-img"] * (BUDGET.max_ids + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_ids" in details
    got = client.get(["keep-txt", "keep-img", "keep-txt", "keep-img"])
    assert [i.id for i in got.items] == ["keep-txt", "keep-img"]
    _still_serving_and_intact(client)  # the Delete deleted nothing


# -- id rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_id, rule", [
    ("a\x00b", "printable"),
    ("line\nbreak", "printable"),
    ("\x1b[31mred", "printable"),
    ("\u00e9" * 129, "256-byte"),  # 129 characters, 258 bytes of UTF-8
    (" padded", "whitespace"),
    ("keep-img/region/centre", "reserved"),
    ("volume-1/chunk/0", "reserved"),
])
def test_bad_item_ids_are_refused_naming_the_item_and_the_rule(client, bad_id, rule):
    code, details = _code(lambda: client.ingest([
        pb.IngestItem(id="fine", text="Heart size normal."),
        pb.IngestItem(id=bad_id, text="Left pleural effusion.")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("items[1].id") and rule in details
    assert bad_id not in details
    _still_serving_and_intact_but_fine(client)


def _still_serving_and_intact_but_fine(client) -> None:
    """Intact, once the good item of the same call (if it was stored) is gone again."""
    if _has(client, "fine"):
        client.delete(["fine"])
    _still_serving_and_intact(client)


def _has(client, item_id: str) -> bool:
    try:
        client.get([item_id])
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        return False
    return True


def test_a_plain_item_cannot_overwrite_another_items_region_child(client):
    before = client.get(["keep-img/region/centre"], with_embedding=True).items[0]
    assert before.parent_id == "keep-img" and before.region == "centre"
    code, details = _code(lambda: client.ingest([
        pb.IngestItem(id="keep-img/region/centre", image=png_bytes("stripes"))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "reserved" in details
    after = client.get(["keep-img/region/centre"], with_embedding=True).items[0]
    assert after == before
    _still_serving_and_intact(client)


@pytest.mark.parametrize("name, rule", [("a/b", "'/'"), ("x\x00", "printable"),
                                        ("r" * 65, "64-byte")])
def test_bad_region_names_are_refused(client, name, rule):
    code, details = _code(lambda: client.ingest([pb.IngestItem(
        id="with-region", image=png_bytes("checker"),
        regions=[pb.Region(name=name, box=pb.Box(x0=2, y0=2, x1=30, y1=30))])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("items[0].regions[0].name") and rule in details
    assert not _has(client, "with-region")
    _still_serving_and_intact(client)


# -- the costing itself, below the server ------------------------------------------------
def test_resample_budget_is_exact_at_the_boundary_and_survives_absurd_spacings():
    from medseek.io import LimitExceededError
    from medseek.serve.ingest import check_resample_budget

    eight = RequestBudget(max_resampled_voxels=8)
    assert check_resample_budget((4, 4, 4), (1.0, 1.0, 1.0), 2.0, "v", eight) == (2, 2, 2)
    with pytest.raises(LimitExceededError, match=r"3x2x2 = 12 voxels .*max_resampled_voxels=8"):
        check_resample_budget((6, 4, 4), (1.0, 1.0, 1.0), 2.0, "v", eight)
    for spacing in (1e300, 1e308):  # a huge int, then an infinite float
        with pytest.raises(LimitExceededError, match="max_resampled_voxels"):
            check_resample_budget((4, 4, 4), (spacing,) * 3, 4.0, "v", BUDGET)


def test_archive_ratio_counts_all_members_and_a_lying_directory_is_refused():
    from medseek.io import LimitExceededError, MedicalImageError, ReadLimits
    from medseek.io.archive import read_zip

    bomb = zip_bomb(8)
    with pytest.raises(LimitExceededError, match=r"\(all members\): compression ratio"):
        read_zip(bomb, "z", ReadLimits())
    assert len(read_zip(bomb, "z", ReadLimits(max_zip_ratio=1e6))) == 8
    # a directory that under-declares a member: refused, never inflated past what it says
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a.dcm", bytes(4 * MIB))
    raw = bytearray(buf.getvalue())
    central = raw.rindex(b"PK\x01\x02")
    raw[central + 24:central + 28] = (1000).to_bytes(4, "little")  # uncompressed size
    with pytest.raises(MedicalImageError, match="z!a.dcm"):
        read_zip(bytes(raw), "z", ReadLimits())


def test_nifti_reader_keeps_values_byte_order_and_layout():
    from medseek.io import MedicalImageError, read_nifti

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 3000, size=(5, 6, 7)).astype(">i2")  # big-endian on disk
    img = nib.Nifti1Image(arr, np.diag([-1.0, -1.0, 1.0, 1.0]))  # already L, P, S
    img.header.set_slope_inter(1.0, -1024.0)
    data = img.to_bytes()
    for blob in (data, zlib.compress(data, wbits=16 + zlib.MAX_WBITS)):
        vol = read_nifti(blob)
        assert vol.array.dtype == np.int16 and vol.array.flags.writeable
        np.testing.assert_array_equal(vol.array, (arr.astype(np.int32) - 1024).transpose(2, 1, 0))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(data[:348]))
    hdr.set_data_offset(0)  # data "inside" the header: read as data before
    with pytest.raises(MedicalImageError, match="vox_offset 0"):
        read_nifti(hdr.binaryblock + data[348:])
