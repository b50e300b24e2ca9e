"""Volume chunks and organs over the API: a volume ingest stores its chunk embeddings as
children with z-ranges, organs (name + z-range) pool the chunks covering them, and a search
with ``region.name`` reranks volumes by that organ. Real gRPC server on port 0, SQLite,
FAISS, the in-process torch encoder (and ONNX Runtime for ``encode_volume_chunks``)."""

from __future__ import annotations

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")  # the [server] extra
pytest.importorskip("grpc_health")
from medseek.io import ReadLimits  # noqa: E402
from medseek.serve import ingest as ing  # noqa: E402
from medseek.serve import item_records  # noqa: E402
from medseek.serve.client import RetrievalClient  # noqa: E402
from medseek.serve.config import BatchConfig, PreprocessSpec, ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402
from medseek.serve.v1 import retrieval_pb2 as pb  # noqa: E402

DEPTH = 16  # ct-tiny's chunk_depth; volumes are written at its 4 mm target spacing


def nifti(blocks: list[np.ndarray], spacing_z: float = 4.0) -> bytes:
    """NIfTI bytes of the (D, H, W) volume made of ``blocks`` stacked along z."""
    import nibabel as nib

    vol = np.concatenate(blocks).astype(np.float32)
    return nib.Nifti1Image(vol.transpose(2, 1, 0), affine=np.diag([4.0, 4.0, spacing_z, 1.0])
                           ).to_bytes()


def block(seed: int) -> np.ndarray:
    """One chunk's worth of slices, (16, 16, 16) HU-like noise."""
    return np.random.default_rng(seed).normal(40, 80, size=(DEPTH, 16, 16))


def liver(z0: int, z1: int) -> pb.Region:
    """The organ at slices [z0, z1) (z1 exclusive)."""
    return pb.Region(name="liver", z_range=pb.ZRange(z_start=z0, z_end=z1))


@pytest.fixture(scope="module")
def encoder():
    return LocalTorchEncoder(seed=0)


@pytest.fixture(scope="module")
def client(tmp_path_factory, encoder):
    d = tmp_path_factory.mktemp("chunks")
    cfg = ServeConfig(store_path=d / "store.db", index_dir=d / "index", port=0, grace_s=2.0,
                      encode_batch=BatchConfig(max_wait_ms=10.0))
    with ServerThread(cfg, encoder) as s, RetrievalClient(f"127.0.0.1:{s.port}") as c:
        yield c


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def _stats(client) -> dict:
    return {c.name: c for c in client.stats().collections}


def test_volume_ingest_stores_chunks_and_organ_with_z_ranges(client, encoder):
    blocks = [block(1), block(2), block(3)]  # 48 slices: chunks [0, 16), [16, 32), [32, 48)
    ack = client.ingest([pb.IngestItem(id="ct-a", volume=nifti(blocks), labels=["lesion"],
                                       patient_pseudonym="PA", regions=[liver(10, 21)])])
    assert ack.inserted == 1
    chunk_ids = [f"ct-a/chunk/{n}" for n in range(3)]
    got = {i.id: i for i in client.get(["ct-a", *chunk_ids, "ct-a/region/liver"],
                                       with_embedding=True).items}
    assert not got["ct-a"].HasField("z_range")
    assert [(got[c].z_range.z_start, got[c].z_range.z_end) for c in chunk_ids] == \
        [(0, 16), (16, 32), (32, 48)]
    for c in chunk_ids:
        assert (got[c].collection, got[c].parent_id) == ("chunk", "ct-a")
        assert list(got[c].labels) == ["lesion"] and got[c].patient_pseudonym == "PA"
    organ = got["ct-a/region/liver"]
    assert (organ.collection, organ.parent_id, organ.region) == ("region", "ct-a", "liver")
    assert (organ.z_range.z_start, organ.z_range.z_end) == (10, 21)

    # the stored vectors are the encoder's, for the volume the server decoded
    dec = ing.decode_volume(nifti(blocks), "v", PreprocessSpec(volume_multiple=(8, 8)),
                            ReadLimits(), None)
    want = encoder.encode_volume_chunks([dec.payload])[0]
    chunks = np.array([got[c].embedding for c in chunk_ids])
    np.testing.assert_allclose(chunks, want.chunks, atol=1e-5)
    np.testing.assert_allclose(got["ct-a"].embedding, want.volume, atol=1e-5)
    # organ slices 10-20: 6 slices of chunk 0 and 5 of chunk 1, then unit norm
    pooled = 6 * want.chunks[0] + 5 * want.chunks[1]
    np.testing.assert_allclose(organ.embedding, pooled / np.linalg.norm(pooled), atol=1e-5)
    stats = _stats(client)
    assert stats["chunk"].items >= 3 and stats["chunk"].indexed == stats["chunk"].items


def test_organ_search_reranks_volumes_by_the_organ_chunks(client):
    # A shares the query's chunks outside the liver, B only the liver chunk (the rest is
    # air): globally A is nearer; conditioned on the liver (slices 16-31 = chunk 1), B must
    # come first.
    q = [block(10), block(11), block(12)]
    air = np.full((DEPTH, 16, 16), -1000.0)
    a = [q[0], air, q[2]]
    b = [air, q[1], air]
    items = [pb.IngestItem(id=f"org-{n}", volume=nifti(v), body_part="abdomen",
                           regions=[liver(16, 32)]) for n, v in (("Q", q), ("A", a), ("B", b))]
    items.append(pb.IngestItem(id="org-C", volume=nifti([q[0], block(16), q[2]]),
                               body_part="abdomen"))  # no liver given
    assert client.ingest(items).inserted == 4
    abdomen = pb.Filters(body_part=["abdomen"])
    plain = [h.id for h in client.search(pb.SearchRequest(item_id="org-Q", k=3,
                                                          filters=abdomen)).hits]
    assert plain[2] == "org-B"  # A and C share two chunks with the query, B one
    organ = client.search(pb.SearchRequest(item_id="org-Q", k=3, filters=abdomen,
                                           region=pb.Region(name="liver")))
    ids = [h.id for h in organ.hits]
    assert ids[0] == "org-B" and ids.index("org-B") < ids.index("org-A")
    top = organ.hits[0]
    assert top.matched_region == "liver" and top.region_id == "org-B/region/liver"
    assert top.region_score == pytest.approx(1.0, abs=1e-4)
    missing = next(h for h in organ.hits if h.id == "org-C")
    assert not missing.HasField("region_score") and missing.matched_region == ""
    # a query volume without the organ: a clear error, and the server keeps serving
    code, msg = _code(lambda: client.search(pb.SearchRequest(
        item_id="org-C", k=3, region=pb.Region(name="liver"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "region.name" in msg and "liver" in msg
    assert client.search(pb.SearchRequest(item_id="org-C", k=1)).hits


def test_volume_query_with_an_organ_reranks_like_the_stored_item(client):
    # the volume bytes of an ingested item, with its organ's z-range, must rank as the
    # item_id query does (which reads the stored volume and organ embeddings); the volume
    # query also finds the stored item itself, which item_id leaves out
    q = [block(40), block(41), block(42)]
    air = np.full((DEPTH, 16, 16), -1000.0)
    vols = {"Q": q, "A": [q[0], air, q[2]], "B": [air, q[1], air],
            "C": [q[0], block(43), q[2]]}
    items = [pb.IngestItem(id=f"vq-{n}", volume=nifti(v), body_part="pelvis",
                           labels=[f"l{n}"], regions=[] if n == "C" else [liver(16, 32)])
             for n, v in vols.items()]
    assert client.ingest(items).inserted == 4
    pelvis = pb.Filters(body_part=["pelvis"])
    by_id = client.search(pb.SearchRequest(item_id="vq-Q", k=3, filters=pelvis,
                                           region=pb.Region(name="liver"))).hits
    by_bytes = client.search(pb.SearchRequest(volume=nifti(q), k=4, filters=pelvis,
                                              region=liver(16, 32))).hits
    assert by_bytes[0].id == "vq-Q" and by_bytes[0].region_score == pytest.approx(1, abs=1e-4)
    rest = by_bytes[1:]
    assert [h.id for h in rest] == [h.id for h in by_id]
    assert by_id[0].id == "vq-B"  # the organ, not the whole volume, decided the order
    for got, want in zip(rest, by_id):
        assert got.HasField("region_score") == want.HasField("region_score")
        assert (got.matched_region, got.region_id) == (want.matched_region, want.region_id)
        for name in ("score", "global_score", "region_score"):
            assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-4), name
    # the query's organ pools the chunks of ITS z-range: slices 0-15 are chunk 0, so the
    # stored item's liver (chunk 1) scores their cosine
    got = {i.id: np.array(i.embedding) for i in client.get(
        ["vq-Q/chunk/0", "vq-Q/region/liver"], with_embedding=True).items}
    want = float(got["vq-Q/chunk/0"] @ got["vq-Q/region/liver"])
    hits = client.search(pb.SearchRequest(volume=nifti(q), k=4, filters=pelvis,
                                          region=liver(0, 16))).hits
    own = next(h for h in hits if h.id == "vq-Q")
    assert own.region_score == pytest.approx(want, abs=1e-4) and want < 0.9999
    # Diagnose runs the same search path: the organ-reranked neighbours vote
    diag = client.diagnose(pb.DiagnoseRequest(volume=nifti(q), k=4, filters=pelvis,
                                              region=liver(16, 32)))
    assert [h.id for h in diag.neighbours] == [h.id for h in by_bytes]


@pytest.mark.parametrize("region, words", [
    (liver(40, 49), "region.z_range: z_end 49 is past the volume's end: it has 48 slices"),
    (liver(9, 3), "region.z_range: z_start 9 must be before z_end 3"),
    (liver(5, 5), "region.z_range: z_start 5 must be before z_end 5"),  # empty
    (pb.Region(name="liver"), "region.z_range: a volume query's region needs a z_range"),
    (pb.Region(name="liver", box=pb.Box(x0=0, y0=0, x1=4, y1=4)), "region.box: a volume"),
    (pb.Region(z_range=pb.ZRange(z_start=0, z_end=3)), "region.name: must be non-empty"),
])
def test_bad_query_organs_name_the_field_and_the_server_keeps_serving(client, region, words):
    vol = nifti([block(1), block(2), block(3)])
    for call in (lambda: client.search(pb.SearchRequest(volume=vol, k=2, region=region)),
                 lambda: client.diagnose(pb.DiagnoseRequest(volume=vol, k=2, region=region))):
        code, msg = _code(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and words in msg, msg
    assert client.search(pb.SearchRequest(volume=vol, k=1)).hits


@pytest.mark.parametrize("region, words", [
    (liver(40, 49), "z_end 49 is past the volume's end: it has 48 slices"),
    (liver(9, 3), "z_start 9 must be before z_end 3"),
    (liver(5, 5), "z_start 5 must be before z_end 5"),  # empty
    (pb.Region(name="liver", box=pb.Box(x0=0, y0=0, x1=4, y1=4)), "needs a z_range"),
    (pb.Region(z_range=pb.ZRange(z_start=0, z_end=3)), "name: must be non-empty"),
])
def test_bad_organs_name_the_field_and_store_nothing(client, region, words):
    before = _stats(client)
    code, msg = _code(lambda: client.ingest([pb.IngestItem(
        id="bad-organ", volume=nifti([block(1), block(2), block(3)]), regions=[region])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert msg.startswith("items[0].regions[0]") and words in msg
    assert {n: c.items for n, c in _stats(client).items()} == \
        {n: c.items for n, c in before.items()}


def test_repeated_region_names_are_refused(client):
    code, msg = _code(lambda: client.ingest([pb.IngestItem(
        id="twice", volume=nifti([block(1)]), regions=[liver(0, 4), liver(4, 9)])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "regions[1].name: repeats" in msg


def test_reingest_replaces_chunks_and_delete_removes_them(client):
    three = nifti([block(20), block(21), block(22)])
    client.ingest([pb.IngestItem(id="ct-re", volume=three, regions=[liver(0, 41)])])
    before = _stats(client)["chunk"].items
    # the new version has two chunks and no organ: the old third chunk and organ go
    client.ingest([pb.IngestItem(id="ct-re", volume=nifti([block(23), block(24)]))])
    assert _stats(client)["chunk"].items == before - 1
    code, _ = _code(lambda: client.get(["ct-re/chunk/2"]))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(lambda: client.get(["ct-re/region/liver"]))
    assert code == grpc.StatusCode.NOT_FOUND
    deleted = client.delete(["ct-re"]).deleted
    assert list(deleted) == ["ct-re", "ct-re/chunk/0", "ct-re/chunk/1"]
    stats = _stats(client)
    assert stats["chunk"].items == before - 3 and stats["chunk"].indexed == stats["chunk"].items
    hits = client.search(pb.SearchRequest(volume=nifti([block(23), block(24)]),
                                          collection="chunk", k=50)).hits
    assert not [h.id for h in hits if h.id.startswith("ct-re/")]


def test_chunk_z_ranges_map_back_to_the_uploaded_slices():
    # 1 mm slices resampled to 4 mm: uploaded slice k sits nearest resampled slice k / 4
    # (half-open ranges [z0, z1) in and out)
    z = item_records.source_z_ranges(np.array([[0, 4], [4, 8], [8, 10]]), 4.0, 40, 10)
    assert z.tolist() == [[0, 14], [14, 30], [30, 40]]  # a tiling of all 40 slices
    # 10 mm slices resampled to 1 mm: a chunk between two uploaded slices gets both
    z = item_records.source_z_ranges(np.array([[0, 4], [4, 8], [8, 30]]), 0.1, 3, 30)
    assert z.tolist() == [[0, 1], [0, 2], [1, 3]]


def test_anisotropic_volume_chunks_count_uploaded_slices(client):
    # 2 mm slices: 64 uploaded slices are 32 at 4 mm (resampled i samples slice 2i), two
    # chunks of 16
    vol = nifti([block(30), block(31), block(32), block(33)], spacing_z=2.0)
    client.ingest([pb.IngestItem(id="ct-2mm", volume=vol, regions=[liver(32, 64)])])
    got = {i.id: i for i in client.get(["ct-2mm/chunk/0", "ct-2mm/chunk/1",
                                        "ct-2mm/region/liver"], with_embedding=True).items}
    assert [(got[f"ct-2mm/chunk/{n}"].z_range.z_start, got[f"ct-2mm/chunk/{n}"].z_range.z_end)
            for n in range(2)] == [(0, 31), (31, 64)]  # slice 31 lies halfway: the later
    np.testing.assert_allclose(got["ct-2mm/region/liver"].embedding,
                               got["ct-2mm/chunk/1"].embedding, atol=1e-5)
    client.delete(["ct-2mm"])


def test_onnx_runtime_encode_volume_chunks_matches_torch(tmp_path):
    import torch

    from medseek.encoders import OnnxRuntimeEncoder
    from medseek.export.repository import write_repository
    from medseek.models import create_model

    torch.manual_seed(0)
    model = create_model("ct-tiny").eval()
    write_repository([model], tmp_path)
    enc = OnnxRuntimeEncoder(tmp_path, "volume")
    rng = np.random.default_rng(5)
    vols = [rng.random((20, 16, 24), dtype=np.float32), rng.random((40, 16, 16), np.float32)]
    out = enc.encode_volume_chunks(vols)
    np.testing.assert_allclose(np.stack([o.volume for o in out]), enc.encode_volumes(vols),
                               atol=1e-6)
    for vol, o in zip(vols, out):
        with torch.inference_mode():
            want = model.encode_volume_array(vol)
        cos = (o.chunks * want.chunks.numpy()).sum(1)
        assert o.chunks.shape == (len(want.valid), 32) and cos.min() >= 0.9999
        assert o.z_range.tolist() == [[z, z + v] for z, v in zip(want.z_start, want.valid)]
    assert out[0].z_range.tolist() == [[0, 16], [16, 20]]  # a padded last chunk ends at 20


def test_manifest_regions_carry_organs_and_boxes(tmp_path):
    from medseek.serve.ingest_sources import iter_items

    (tmp_path / "ct.nii").write_bytes(nifti([block(1)]))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"id": "v", "path": "ct.nii", "regions": [{"name": "liver", "z_range": [3, 9]}]}\n'
        '{"id": "t", "text": "x", "regions": [{"name": "c", "box": [1, 2, 30, 40]}]}\n')
    vol, txt = list(iter_items(manifest))
    assert vol.WhichOneof("content") == "volume" and len(vol.regions) == 1
    assert (vol.regions[0].name, vol.regions[0].z_range.z_end) == ("liver", 9)
    assert (txt.regions[0].box.x1, txt.regions[0].box.y1) == (30, 40)
    manifest.write_text('{"id": "v", "path": "ct.nii", "regions": [{"name": "liver"}]}\n')
    with pytest.raises(ValueError, match="m.jsonl:1: each region needs a name and one of"):
        list(iter_items(manifest))
