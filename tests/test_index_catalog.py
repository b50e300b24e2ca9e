"""Catalog: indexes derived from the store, caught up on start-up, rebuilt when unusable."""

import logging
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from medseek.index.catalog import Catalog, CatalogConfig
from medseek.index.faiss_config import FaissConfig
from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store

DIM = 8
PER = {"chunk": FaissConfig(kind="hnsw", hnsw_m=8, ef_construction=40)}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit_rows(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def ingest(store, prefix, n, seed, collection="image"):
    items = [ItemRecord(f"{prefix}{i}", collection, patient_pseudonym=f"P-secret-{i}")
             for i in range(n)]
    store.upsert(items, unit_rows(n, seed))


def assert_consistent(catalog, store):
    for name in store.collections():
        np.testing.assert_array_equal(catalog.index(name).ids(), store.filter_row_keys(name))
        assert catalog.applied_seq(name) == store.last_seq()


@pytest.fixture
def env(tmp_path):
    store = Store(StoreConfig(tmp_path / "s.db"))
    config = CatalogConfig(index_dir=tmp_path / "indexes", per_collection=PER)
    ingest(store, "img-", 40, seed=1)
    ingest(store, "chk-", 30, seed=2, collection="chunk")
    catalog = Catalog(store, config)
    assert catalog.open() == {"chunk": "rebuilt: no saved index",
                              "image": "rebuilt: no saved index"}
    assert catalog.index("chunk").config.kind == "hnsw"
    assert_consistent(catalog, store)
    catalog.save()
    yield store, config, catalog
    store.close()


def test_reopen_catches_up_adds_updates_deletes(env):
    store, config, _ = env
    ingest(store, "img-", 5, seed=3)                  # img-0..4 get new vectors
    ingest(store, "late-", 10, seed=4)
    ingest(store, "chk-new-", 5, seed=5, collection="chunk")
    store.delete(["img-10", "img-11", "late-3", "chk-7"])
    store.upsert([ItemRecord("chk-8", "image")], unit_rows(1, 6))  # moves chunk -> image
    catalog = Catalog(store, config)
    assert catalog.open() == {"chunk": "loaded", "image": "loaded"}
    assert_consistent(catalog, store)
    new = unit_rows(5, 3)
    scores, ids = catalog.search("image", new, 1)
    assert ids[:, 0].tolist() == [store.get([f"img-{i}"])[f"img-{i}"].row_key for i in range(5)]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    # later writes are picked up by sync() without a restart
    store.delete(["img-20"])
    ingest(store, "more-", 3, seed=7)
    [report] = catalog.sync("image")
    assert (report.removed, report.upserted) == (1, 3)
    np.testing.assert_array_equal(catalog.index("image").ids(), store.filter_row_keys("image"))
    assert [(r.collection, r.removed, r.upserted) for r in catalog.sync()] == [
        ("chunk", 0, 0), ("image", 0, 0)]
    assert_consistent(catalog, store)


def test_missing_index_file_is_rebuilt(env):
    store, config, _ = env
    (config.index_dir / "image.npz").unlink()
    ingest(store, "late-", 4, seed=4)
    catalog = Catalog(store, config)
    assert catalog.open() == {"chunk": "loaded", "image": "rebuilt: no saved index"}
    assert_consistent(catalog, store)
    assert (config.index_dir / "image.npz").exists()  # saved again after the rebuild


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_index_file_is_rebuilt_with_a_warning_and_no_phi(env, caplog, damage):
    store, config, _ = env
    path = config.index_dir / "chunk.npz"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) - 100])
    else:
        path.write_bytes(raw[:2000] + bytes(b ^ 0x5A for b in raw[2000:2200]) + raw[2200:])
    store.delete(["chk-1"])
    catalog = Catalog(store, config)
    with caplog.at_level(logging.DEBUG, logger="medseek"):
        outcome = catalog.open()
    assert outcome["image"] == "loaded" and outcome["chunk"].startswith("rebuilt: unreadable")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "collection chunk is unusable" in warnings[0].getMessage()
    assert "P-secret" not in caplog.text
    assert_consistent(catalog, store)


def test_index_ahead_of_a_restored_store_is_rebuilt(env, tmp_path):
    store, config, catalog = env
    store.backup(tmp_path / "backup.db")
    ingest(store, "after-backup-", 6, seed=8)
    catalog.sync()
    catalog.save()  # saved at a seq the backup never reached
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 's.db'}{suffix}").unlink(missing_ok=True)
    shutil.copy(tmp_path / "backup.db", tmp_path / "s.db")
    restored = Store(StoreConfig(tmp_path / "s.db"))
    try:
        catalog = Catalog(restored, config)
        reason = "rebuilt: saved at seq 76, ahead of the store's last seq 70"
        assert catalog.open() == {"chunk": reason, "image": reason}
        assert_consistent(catalog, restored)
        assert len(catalog.index("image")) == 40
    finally:
        restored.close()


def test_index_of_another_store_is_rebuilt(env, tmp_path):
    _, config, _ = env
    other = Store(StoreConfig(tmp_path / "other.db"))
    try:
        ingest(other, "o-", 12, seed=9)
        catalog = Catalog(other, config)
        assert catalog.open() == {"image": "rebuilt: saved for another store or collection"}
        assert_consistent(catalog, other)
    finally:
        other.close()


def test_small_ivfpq_collection_is_served_flat_until_it_can_train(tmp_path):
    ivf = FaissConfig(kind="ivfpq", nlist=4, m=4, nbits=4, nprobe=4)  # min_train = 16
    store = Store(StoreConfig(tmp_path / "s.db"))
    try:
        catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / "ix", faiss=ivf))
        ingest(store, "a-", 10, seed=1)
        catalog.open()
        assert catalog.index("image").config.kind == "flat"
        ingest(store, "b-", 10, seed=2)
        catalog.sync()
        assert catalog.index("image").config.kind == "ivfpq"
        assert_consistent(catalog, store)
        catalog.save()
        again = Catalog(store, catalog.config)
        assert again.open() == {"image": "loaded"}
    finally:
        store.close()


def test_index_older_than_the_pruned_changelog_is_rebuilt(env):
    store, config, _ = env                       # indexes saved at seq 70
    store.delete(["img-3"])                      # seq 71
    ingest(store, "late-", 2, seed=4)            # seqs 72, 73
    assert store.prune_changelog(72) == 72 and store.changelog_floor() == 72
    catalog = Catalog(store, config)
    reason = "rebuilt: saved at seq 70, before the pruned changelog's start"
    assert catalog.open() == {"chunk": reason, "image": reason}
    assert_consistent(catalog, store)
    catalog.save()                               # now at seq 73 >= floor: catch-up works
    store.delete(["img-4"])
    assert Catalog(store, config).open() == {"chunk": "loaded", "image": "loaded"}


def test_sync_while_other_threads_write(env):
    store, _, catalog = env
    errors = []

    def writer(w):
        try:
            for i in range(15):
                ingest(store, f"w{w}-{i}-", 2, seed=100 * w + i)
                if i % 5 == 4:
                    store.delete([f"w{w}-{i}-0"])
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        catalog.sync()
        catalog.search("image", unit_rows(2, 0), 5)
    for t in threads:
        t.join()
    assert errors == []
    catalog.sync()
    assert_consistent(catalog, store)
    assert len(catalog.index("image")) == 40 + 3 * (30 - 3)
