"""MilvusIndex on a real milvus-lite database, checked against FaissIndex exact flat."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'medseek[milvus]')")
lite = pytest.importorskip("milvus_lite.server_manager",
                           reason="milvus-lite is not installed (pip install 'medseek[milvus]')")

from medseek.index.faiss_config import (  # noqa: E402
    FaissConfig, IndexFileError, MilvusConfig, load_index, make_index,
)
from medseek.index.faiss_index import FaissIndex  # noqa: E402
from medseek.index.milvus_index import MilvusIndex  # noqa: E402

DIM = 24


def unit_rows(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """One milvus-lite database for the module (its server starts once, in-process)."""
    cfg = MilvusConfig(uri=str(tmp_path_factory.mktemp("milvus") / "medseek.db"))
    yield cfg
    lite.server_manager_instance.release_server(cfg.uri)


@pytest.fixture(scope="module")
def filled(config):
    """A 300-vector Milvus index and the FaissIndex flat reference holding the same data."""
    rng = np.random.default_rng(7)
    ids = np.ascontiguousarray(rng.choice(10_000, 300, replace=False).astype(np.int64))
    vectors = unit_rows(rng, 300)
    milvus = MilvusIndex(DIM, config, "parity")
    milvus.add(ids, vectors)
    faiss = FaissIndex(DIM, FaissConfig(kind="flat"))
    faiss.add(ids, vectors)
    yield milvus, faiss, ids, vectors
    milvus.close()


def test_matches_faiss_flat_ids_and_scores(filled):
    milvus, faiss, ids, _ = filled
    queries = unit_rows(np.random.default_rng(1), 9)
    ms, mi = milvus.search(queries, 12)
    fs, fi = faiss.search(queries, 12)
    assert len(milvus) == 300
    np.testing.assert_array_equal(mi, fi)
    np.testing.assert_allclose(ms, fs, rtol=0, atol=2e-6)
    assert ms.dtype == np.float32 and mi.dtype == np.int64
    np.testing.assert_array_equal(milvus.ids(), np.sort(ids))


def test_pads_when_k_exceeds_the_collection(config):
    rng = np.random.default_rng(2)
    with MilvusIndex(DIM, config, "small") as index:
        index.add(np.array([5, 9, 2], dtype=np.int64), unit_rows(rng, 3))
        scores, ids = index.search(unit_rows(rng, 2), 5)
    assert (ids[:, :3] >= 0).all() and (ids[:, 3:] == -1).all()
    assert np.isfinite(scores[:, :3]).all() and np.isneginf(scores[:, 3:]).all()
    assert (np.diff(scores[:, :3], axis=1) <= 0).all()


def test_filter_is_applied_inside_the_search(filled):
    milvus, faiss, ids, vectors = filled
    queries = np.ascontiguousarray(vectors[:4])  # each query's own vector is its top hit
    # the allowed ids are the *least* similar to query 0: a top-k-then-filter would miss them
    far = ids[np.argsort(vectors @ queries[0])[:5]]
    allowed = np.concatenate([far, np.array([999_999], dtype=np.int64)])  # + an absent id
    ms, mi = milvus.search(queries, 8, allowed)
    fs, fi = faiss.search(queries, 8, allowed)
    np.testing.assert_array_equal(mi, fi)
    np.testing.assert_allclose(ms, fs, rtol=0, atol=2e-6)
    assert set(mi[0, :5].tolist()) == set(far.tolist()) and (mi[:, 5:] == -1).all()
    _, none = milvus.search(queries, 3, np.empty(0, dtype=np.int64))
    assert (none == -1).all()


def test_remove_upsert_and_count(config):
    rng = np.random.default_rng(3)
    ids = np.arange(10, 60, dtype=np.int64)
    vectors = unit_rows(rng, 50)
    with MilvusIndex(DIM, config, "mutate") as index:
        index.add(ids, vectors)
        assert index.remove(np.array([10, 11, 11, 5000], dtype=np.int64)) == 2  # dup, absent
        assert index.remove(np.array([10], dtype=np.int64)) == 0
        assert len(index) == 48
        _, hit = index.search(np.ascontiguousarray(vectors[:2]), 48)
        assert not np.isin(hit, [10, 11]).any()
        # upsert: id 20 gets a new vector, and a query for that vector finds it first
        fresh = unit_rows(rng, 1)
        index.add(np.array([20], dtype=np.int64), fresh)
        assert len(index) == 48
        scores, top = index.search(fresh, 1)
        assert top[0, 0] == 20 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
        _, old = index.search(np.ascontiguousarray(vectors[10:11]), 1)  # id 20's old vector
        assert old[0, 0] != 20


def test_reopen_from_disk(tmp_path):
    config = MilvusConfig(uri=str(tmp_path / "reopen.db"))  # its own server, stopped below
    rng = np.random.default_rng(4)
    ids, vectors = np.arange(100, dtype=np.int64), unit_rows(rng, 100)
    queries = unit_rows(rng, 3)
    index = MilvusIndex(DIM, config, "reopen")
    index.add(ids, vectors)
    index.remove(np.arange(0, 100, 10, dtype=np.int64))
    before = index.search(queries, 7)
    index.metadata = {"seq": 41, "collection": "reopen"}
    index.save(tmp_path / "reopen.npz")
    index.close()
    # stop milvus-lite's in-process server: the reload reads the data directory afresh
    lite.server_manager_instance.release_server(config.uri)
    loaded = load_index(tmp_path / "reopen.npz", config)
    assert isinstance(loaded, MilvusIndex) and loaded.dim == DIM
    assert loaded.metadata == {"seq": 41, "collection": "reopen"}
    assert len(loaded) == 90
    after = loaded.search(queries, 7)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], rtol=0, atol=1e-6)
    loaded.close()
    lite.server_manager_instance.release_server(config.uri)


def test_load_errors(config, tmp_path):
    with pytest.raises(IndexFileError, match="no saved index"):
        MilvusIndex.load(tmp_path / "missing.npz", config)
    faiss = FaissIndex(DIM)
    faiss.save(tmp_path / "faiss.npz")
    with pytest.raises(IndexFileError, match="not a Milvus sidecar"):
        MilvusIndex.load(tmp_path / "faiss.npz", config)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(IndexFileError, match="unreadable"):
        MilvusIndex.load(tmp_path / "junk.npz", config)
    index = MilvusIndex(DIM, config, "gone")
    index.save(tmp_path / "gone.npz")
    index.close()
    elsewhere = MilvusConfig(uri=str(tmp_path / "other" / "other.db"))
    with pytest.raises(IndexFileError, match="uri="):
        MilvusIndex.load(tmp_path / "gone.npz", elsewhere)
    from pymilvus import MilvusClient

    client = MilvusClient(uri=config.uri)  # someone drops the collection behind our back
    client.drop_collection("medseek_gone")
    client.close()
    with pytest.raises(IndexFileError, match="does not exist"):
        MilvusIndex.load(tmp_path / "gone.npz", config)


def test_new_index_starts_empty(config):
    rng = np.random.default_rng(5)
    with MilvusIndex(DIM, config, "fresh") as first:
        first.add(np.arange(4, dtype=np.int64), unit_rows(rng, 4))
    with MilvusIndex(DIM, config, "fresh") as second:  # a rebuild drops the old rows
        assert len(second) == 0


def test_bad_input(filled, config):
    milvus = filled[0]
    rng = np.random.default_rng(6)
    good = unit_rows(rng, 2)
    with pytest.raises(ValueError, match=f"must have {DIM} columns"):
        milvus.search(unit_rows(rng, 2, DIM + 1), 3)
    with pytest.raises(ValueError, match=f"must have {DIM} columns"):
        milvus.add(np.array([1, 2], dtype=np.int64), unit_rows(rng, 2, DIM - 1))
    nan = good.copy()
    nan[1, 3] = np.nan
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        milvus.search(nan, 3)
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        milvus.add(np.array([1, 2], dtype=np.int64), nan)
    with pytest.raises(ValueError, match="L2-normalised"):
        milvus.add(np.array([1, 2], dtype=np.int64), np.ascontiguousarray(good * 2))
    with pytest.raises(TypeError, match="float32"):
        milvus.search(good.astype(np.float64), 3)
    with pytest.raises(ValueError, match="duplicate id 4"):
        milvus.add(np.array([4, 4], dtype=np.int64), good)
    with pytest.raises(ValueError, match="ids has 3 rows but vectors has 2"):
        milvus.add(np.array([1, 2, 3], dtype=np.int64), good)
    with pytest.raises(ValueError, match="k must be <= 16384"):
        milvus.search(good, 20_000)
    with pytest.raises(ValueError, match="k must be >= 1"):
        milvus.search(good, 0)
    assert len(milvus) == 300  # nothing bad got in
    with pytest.raises(ValueError, match="dim must be a positive int"):
        MilvusIndex(0, config, "bad")
    with pytest.raises(ValueError, match="uri must be a local path ending in .db"):
        MilvusConfig(uri="/tmp/not-a-db")
    with pytest.raises(ValueError, match="Milvus name"):
        config.milvus_collection("has-dash")


def test_make_index_picks_the_backend(config):
    assert isinstance(make_index(DIM, FaissConfig()), FaissIndex)
    with make_index(DIM, config, "made") as index:
        assert isinstance(index, MilvusIndex) and index.milvus_collection == "medseek_made"
    assert MilvusConfig.kind == "milvus"
    with pytest.raises(TypeError, match="FaissConfig or MilvusConfig"):
        make_index(DIM, {"kind": "milvus"})


def test_catalog_builds_reopens_and_catches_up_on_milvus(tmp_path, config):
    from medseek.index.catalog import Catalog, CatalogConfig
    from medseek.index.records import ItemRecord, StoreConfig
    from medseek.index.store import Store

    rng = np.random.default_rng(11)
    store = Store(StoreConfig(tmp_path / "s.db"))
    try:
        store.upsert([ItemRecord(f"img-{i}", "image", view="PA" if i % 2 else "AP")
                      for i in range(40)], unit_rows(rng, 40))
        cat_cfg = CatalogConfig(index_dir=tmp_path / "ix", faiss=config)
        catalog = Catalog(store, cat_cfg)
        assert catalog.open() == {"image": "rebuilt: no saved index"}
        assert isinstance(catalog.index("image"), MilvusIndex)
        np.testing.assert_array_equal(catalog.index("image").ids(),
                                      store.filter_row_keys("image"))
        catalog.save()
        # writes while the service is down are caught up from the store's changelog
        store.delete(["img-3", "img-4"])
        late = unit_rows(rng, 2)
        store.upsert([ItemRecord("late-0", "image"), ItemRecord("late-1", "image")], late)
        again = Catalog(store, cat_cfg)
        assert again.open() == {"image": "loaded"}
        np.testing.assert_array_equal(again.index("image").ids(), store.filter_row_keys("image"))
        scores, ids = again.search("image", late, 1)
        keys = store.get(["late-0", "late-1"])
        assert ids[:, 0].tolist() == [keys["late-0"].row_key, keys["late-1"].row_key]
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    finally:
        store.close()
