"""Store: WAL durability, idempotent upsert, dedup policy, delete, filters, atomicity."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.schema import SCHEMA_VERSION
from medseek.index.store import Store

SHA_A, SHA_B = "a" * 64, "b" * 64


def unit_rows(n, dim=4, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


@pytest.fixture
def store(tmp_path):
    with Store(StoreConfig(tmp_path / "medseek.db")) as s:
        yield s


def corpus():
    """Six pinned items: 4 images of 3 patients, a volume and one chunk of it."""
    return [
        ItemRecord("img-1", "image", modality="CR", body_part="chest", view="PA",
                   labels=("effusion", "cardiomegaly"), patient_pseudonym="P-1",
                   study_pseudonym="S-1", content_sha256=SHA_A),
        ItemRecord("img-2", "image", modality="CR", body_part="chest", view="LAT",
                   labels=("effusion",), patient_pseudonym="P-1", study_pseudonym="S-2"),
        ItemRecord("img-3", "image", modality="DX", body_part="wrist", view="PA",
                   labels=("fracture",), patient_pseudonym="P-2", study_pseudonym="S-3"),
        ItemRecord("img-4", "image", modality="CR", body_part="chest", view="PA"),
        ItemRecord("vol-1", "volume", modality="CT", body_part="chest", patient_pseudonym="P-3"),
        ItemRecord("vol-1/c0", "volume", parent_id="vol-1", z_range=(0, 31)),
    ]


def test_wal_full_sync_and_schema_version(store, tmp_path):
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL
    assert store.pragma("user_version") == SCHEMA_VERSION == 3
    con = sqlite3.connect(tmp_path / "medseek.db")  # WAL is a property of the file
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RuntimeError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        Store(StoreConfig(tmp_path / "medseek.db"))


def test_version_1_inclusive_z_ranges_migrate_to_half_open(tmp_path):
    from medseek.index.schema import MIGRATIONS

    path = tmp_path / "v1.db"
    con = sqlite3.connect(path, isolation_level=None)
    MIGRATIONS[0](con)  # a version-1 store: z_end was the last slice
    con.execute("PRAGMA user_version = 1")
    for key, (item, z) in enumerate([("v", None), ("v/c0", (0, 15)), ("v/liver", (3, 9))], 1):
        con.execute("INSERT INTO items (item_id, collection, parent_id, z_start, z_end, "
                    "created_at, updated_at, seq) VALUES (?, 'chunk', NULL, ?, ?, 0, 0, ?)",
                    (item, *(z or (None, None)), key))
    con.close()
    with Store(StoreConfig(path)) as s:
        assert s.pragma("user_version") == SCHEMA_VERSION
        got = s.get(["v", "v/c0", "v/liver"])
        assert [got[i].record.z_range for i in ("v", "v/c0", "v/liver")] == \
            [None, (0, 16), (3, 10)]


def test_upsert_round_trip_and_idempotent_update(store):
    items, emb = corpus(), unit_rows(6)
    results = store.upsert(items, emb)
    assert [r.status for r in results] == ["inserted"] * 6
    assert [r.row_key for r in results] == [1, 2, 3, 4, 5, 6]
    got = store.get(["img-1", "vol-1/c0", "missing"], with_embeddings=True)
    assert sorted(got) == ["img-1", "vol-1/c0"]
    assert got["img-1"].record == items[0] and got["vol-1/c0"].record.z_range == (0, 31)
    np.testing.assert_array_equal(got["img-1"].embedding, emb[0])
    seq_before = got["img-1"].seq

    changed = ItemRecord("img-1", "image", modality="CR", labels=("pneumothorax",),
                         content_sha256=SHA_A)
    [res] = store.upsert([changed], emb[5:6])
    assert (res.status, res.row_key) == ("updated", 1)
    again = store.get(["img-1"], with_embeddings=True)["img-1"]
    assert again.record == changed and again.seq > seq_before
    np.testing.assert_array_equal(again.embedding, emb[5])
    assert again.created_at <= again.updated_at
    assert store.stats()["items"] == {"image": 4, "volume": 2}
    assert store.stats()["embeddings"] == 6


def test_content_hash_dedup_policy(store):
    emb = unit_rows(5)
    store.upsert(corpus()[:1], emb[:1])
    results = store.upsert([
        ItemRecord("img-dup", "image", content_sha256=SHA_A),     # same bytes, new id
        ItemRecord("img-new", "image", content_sha256=SHA_B),
        ItemRecord("img-dup2", "image", content_sha256=SHA_B),    # duplicate within batch
        ItemRecord("rep-1", "report", content_sha256=SHA_A),      # other collection: fine
    ], emb[1:5])
    assert [(r.status, r.duplicate_of) for r in results] == [
        ("duplicate", "img-1"), ("inserted", None), ("duplicate", "img-new"), ("inserted", None)]
    assert results[0].row_key == 1
    assert sorted(store.get(["img-dup", "img-new", "img-dup2", "rep-1"])) == ["img-new", "rep-1"]
    # chunks and regions are not deduplicated: identical blank chunks of two volumes
    store.upsert([ItemRecord("v1", "volume"), ItemRecord("v2", "volume")], emb[:2])
    chunks = [ItemRecord(f"v{i}/c0", "chunk", parent_id=f"v{i}", content_sha256=SHA_B)
              for i in (1, 2)]
    assert [r.status for r in store.upsert(chunks, emb[2:4])] == ["inserted", "inserted"]
    # re-upserting the same id with the same hash is an update, not a duplicate
    assert store.upsert(corpus()[:1], emb[:1])[0].status == "updated"


def test_delete_cascades_to_children_and_leaves_no_metadata(store):
    store.upsert(corpus(), unit_rows(6))
    seq = store.last_seq()
    assert store.delete(["vol-1", "img-2", "never-stored"]) == ["img-2", "vol-1", "vol-1/c0"]
    assert sorted(store.get(["vol-1", "vol-1/c0", "img-2", "img-1"])) == ["img-1"]
    assert store.stats()["embeddings"] == 3
    assert store.removed_row_keys("image", seq, store.last_seq()).tolist() == [2]
    assert store.removed_row_keys("volume", seq, store.last_seq()).tolist() == [5, 6]
    assert store.last_seq() == seq + 3
    assert store.delete(["vol-1"]) == [] and store.last_seq() == seq + 3


def test_filter_row_keys(store):
    store.upsert(corpus(), unit_rows(6))
    f = store.filter_row_keys
    assert f("image").tolist() == [1, 2, 3, 4]
    assert f("image", modality="CR").tolist() == [1, 2, 4]
    assert f("image", modality=["CR", "DX"]).tolist() == [1, 2, 3, 4]
    assert f("image", body_part="wrist").tolist() == [3]
    assert f("image", view="PA").tolist() == [1, 3, 4]
    assert f("image", labels_any=["effusion"]).tolist() == [1, 2]
    assert f("image", labels_any=["fracture", "cardiomegaly"]).tolist() == [1, 3]
    assert f("image", labels_any=[]).tolist() == []
    # excluding a patient keeps items without a pseudonym (img-4)
    assert f("image", exclude_patients=["P-1"]).tolist() == [3, 4]
    assert f("image", exclude_studies=["S-1", "S-3"]).tolist() == [2, 4]
    assert f("image", modality="CR", view="PA", exclude_patients=["P-1"]).tolist() == [4]
    assert f("volume", body_part="chest").tolist() == [5]
    assert f("report").dtype == np.int64 and f("report").size == 0
    with pytest.raises(TypeError, match="labels_any must be a str or a sequence of str"):
        f("image", labels_any=[1])


def test_failed_batch_leaves_nothing_half_written(store):
    store.upsert([ItemRecord("c-0", "chunk")], unit_rows(1, dim=8))
    store.upsert(corpus()[:2], unit_rows(2))
    before, seq = store.stats(), store.last_seq()
    batch = [ItemRecord("new-1", "image"), ItemRecord("img-1", "image", labels=("x",)),
             ItemRecord("new-2", "chunk")]  # chunk holds dim 8: fails at row 3, in the transaction
    wrong_dim = r"embeddings has dim 4 but collection 'chunk' \(items\[2\]\) holds dim 8"
    with pytest.raises(ValueError, match=wrong_dim):
        store.upsert(batch, unit_rows(3, seed=9))
    orphan = [ItemRecord("new-3", "region"), ItemRecord("r-1", "region", parent_id="nope")]
    with pytest.raises(ValueError, match=r"items\[1\].parent_id refers to an item that is not"):
        store.upsert(orphan, unit_rows(2, seed=9))
    assert store.stats() == before and store.last_seq() == seq
    assert store.get(["new-1", "new-2", "new-3"]) == {}
    assert store.get(["img-1"])["img-1"].record == corpus()[0]  # earlier row intact
    assert "region" not in store.collections()


def test_upsert_validation_names_the_argument(store):
    items = corpus()[:2]
    with pytest.raises(TypeError, match="embeddings must have dtype float32, got float64"):
        store.upsert(items, unit_rows(2).astype(np.float64))
    with pytest.raises(ValueError, match="embeddings has 3 rows for 2 items"):
        store.upsert(items, unit_rows(3))
    with pytest.raises(ValueError, match="embeddings row 1 contains NaN"):
        store.upsert(items, np.array([[1, 0, 0, 0], [np.nan] * 4], dtype=np.float32))
    with pytest.raises(ValueError, match=r"items\[1\].id repeats items\[0\].id 'img-1'"):
        store.upsert([items[0], items[0]], unit_rows(2))
    with pytest.raises(ValueError, match=r"items\[0\].collection must be one of"):
        store.upsert([ItemRecord("x", "slides")], unit_rows(1))
    with pytest.raises(ValueError, match="content_sha256 must be 64 lowercase hex"):
        ItemRecord("x", "image", content_sha256="ABC")
    assert store.last_seq() == 0


def test_moving_an_item_to_another_collection_logs_a_delete(store):
    store.upsert([ItemRecord("x", "image")], unit_rows(1))
    seq = store.last_seq()
    store.upsert([ItemRecord("x", "report")], unit_rows(1, seed=3))
    assert store.removed_row_keys("image", seq, store.last_seq()).tolist() == [1]
    assert store.filter_row_keys("report").tolist() == [1]
    keys, vectors = next(store.iter_embeddings("report", since_seq=seq))
    assert keys.tolist() == [1] and np.array_equal(vectors, unit_rows(1, seed=3))


def test_iter_embeddings_windows_and_pages(store):
    emb = unit_rows(6)
    store.upsert(corpus()[:4], emb[:4])                      # seqs 1..4
    store.upsert([corpus()[1]], emb[4:5])                    # img-2 rewritten: seq 5
    pages = list(store.iter_embeddings("image", batch_size=3))
    assert [p[0].tolist() for p in pages] == [[1, 2, 3], [4]]
    np.testing.assert_array_equal(np.concatenate([p[1] for p in pages]),
                                  emb[[0, 4, 2, 3]])
    since = [k.tolist() for k, _ in store.iter_embeddings("image", since_seq=2)]
    assert since == [[2, 3, 4]]
    until = [k.tolist() for k, _ in store.iter_embeddings("image", since_seq=0, until_seq=3)]
    assert until == [[1, 3]]
    assert list(store.iter_embeddings("report")) == []


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from medseek.index.records import ItemRecord, StoreConfig
    from medseek.index.store import Store

    store = Store(StoreConfig(sys.argv[1]))
    batch = 0
    while True:
        x = np.random.default_rng(batch).standard_normal((5, 16))
        x = np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), np.float32)
        items = [ItemRecord(f"b{batch}-{i}", "image", labels=("l",) * i) for i in range(5)]
        store.upsert(items, x)
        print(batch, flush=True)  # acknowledged only after upsert() returned (COMMIT)
        batch += 1
""")


def test_sigkill_mid_ingest_keeps_every_acknowledged_row(tmp_path):
    path = tmp_path / "killed.db"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked = []
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) == 25:
                os.kill(proc.pid, signal.SIGKILL)  # while it is writing batch 25 or 26
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    acked += [int(v) for v in rest.split()]  # printed before the kill landed
    assert acked == list(range(len(acked))) and len(acked) >= 25
    with Store(StoreConfig(path)) as store:
        assert store.pragma("integrity_check") == "ok"
        n = store.stats()["items"]["image"]
        assert n % 5 == 0 and len(acked) * 5 <= n <= (len(acked) + 1) * 5  # whole batches
        ids = [f"b{b}-{i}" for b in acked for i in range(5)]
        got = store.get(ids, with_embeddings=True)
        assert len(got) == len(ids)
        x = np.random.default_rng(acked[-1]).standard_normal((5, 16))
        expect = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        np.testing.assert_array_equal(got[f"b{acked[-1]}-4"].embedding, expect[4])


def test_item_record_validation_and_no_pseudonyms_in_repr():
    cases = [
        (dict(id=""), ValueError, "id must be a non-empty str"),
        (dict(labels="effusion"), TypeError, "labels must be a list or tuple of str"),
        (dict(modality=3), TypeError, "modality must be a str or None, got int"),
        (dict(z_range=(5, 2)), ValueError, r"z_range must be half-open \(z0, z1\) ints .* got \(5, 2\)"),
        (dict(z_range=(5, 5)), ValueError, r"z_range must be half-open \(z0, z1\) ints .* got \(5, 5\)"),
        (dict(box=(0, 0, float("nan"), 1)), ValueError, "box must be finite"),
        (dict(box=(0, 0, 1)), ValueError, r"box must be finite .* got \(0, 0, 1\)"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            ItemRecord(**{"id": "x", "collection": "image", **kwargs})
    record = ItemRecord("x", "image", patient_pseudonym="P-secret", study_pseudonym="S-secret")
    assert "secret" not in repr(record)


def test_embeddings_of_several_models(tmp_path):
    path = tmp_path / "m.db"
    items = [ItemRecord("a", "image", content_sha256=SHA_A), ItemRecord("b", "image")]
    with Store(StoreConfig(path, model="v1")) as v1:
        v1.upsert(items, unit_rows(2, dim=4))
    with Store(StoreConfig(path, model="v2")) as v2:
        assert v2.collections() == {} and list(v2.iter_embeddings("image")) == []
        v2.upsert(items, unit_rows(2, dim=8, seed=1))  # re-embedding with a wider model
        assert v2.collections() == {"image": 8}
        assert v2.get(["a"], with_embeddings=True)["a"].embedding.shape == (8,)
    with Store(StoreConfig(path, model="v1")) as v1:
        assert v1.collections() == {"image": 4}
        # "a" has an unchanged content hash: its v1 vector survives; "b" has none: dropped
        got = v1.get(["a", "b"], with_embeddings=True)
        np.testing.assert_array_equal(got["a"].embedding, unit_rows(2, dim=4)[0])
        assert got["b"].embedding is None
        assert [k.tolist() for k, _ in v1.iter_embeddings("image")] == [[1]]
        assert v1.removed_row_keys("image", 2, v1.last_seq()).tolist() == [2]  # b leaves v1
