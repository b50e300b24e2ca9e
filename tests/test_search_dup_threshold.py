"""The pipeline's near-duplicate threshold, calibrated to the collection: a tightly packed
collection (a barely trained model) still gives k hits, a spread one keeps the configured
threshold, and a result short of k because of near-duplicates says so."""

import numpy as np
import pytest

from medseek.index.catalog import Catalog, CatalogConfig
from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.search.diversify import DUP_CEILING
from medseek.search.pipeline import SearchPipeline
from medseek.search.query import SearchConfig

DIM, N, K = 16, 300, 10


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def packed(rng, n=N):
    """A narrow cone: median pairwise cosine ~0.99, nearly every pair above 0.98."""
    return unit(unit(rng.standard_normal(DIM)) + 0.03 * rng.standard_normal((n, DIM)))


def records(n, start=0):
    return [ItemRecord(f"img-{i:04d}", "image") for i in range(start, start + n)]


@pytest.fixture
def open_store(tmp_path):
    stores = []

    def make(embs):
        store = Store(StoreConfig(tmp_path / f"store{len(stores)}.db"))
        stores.append(store)
        store.upsert(records(len(embs)), embs)
        catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / f"index{len(stores)}"))
        catalog.open()
        return store, catalog

    yield make
    for s in stores:
        s.close()


def pair_quantile(embs, q=0.999):
    e = embs.astype(np.float64)
    return float(np.quantile((e @ e.T)[np.triu_indices(len(e), 1)], q))


def test_packed_collection_still_gives_k_hits(open_store):
    embs = packed(np.random.default_rng(1))
    assert np.median((embs @ embs.T)[np.triu_indices(N, 1)]) > 0.98
    store, catalog = open_store(embs)
    query = embs[7]
    # the absolute threshold alone: nearly every candidate is a duplicate of the first hit,
    # and the result says so instead of silently returning few hits
    with SearchPipeline(catalog, store, SearchConfig(dup_quantile=None)) as fixed:
        res = fixed.search("image", query, k=K)
    assert len(res.hits) < K and res.dup_threshold == 0.98
    assert res.near_duplicate_shortfall == K - len(res.hits)
    assert f"{len(res.hits)} hits" in res.notice and "near-duplicates" in res.notice
    assert any("near_duplicate of" in why for _, why in res.skipped)
    # calibrated (the default): above the floor, at the collection's 99.9th percentile pair
    with SearchPipeline(catalog, store, SearchConfig()) as pipe:
        t = pipe.dup_threshold("image")
        res = pipe.search("image", query, k=K)
    assert 0.98 < t <= DUP_CEILING
    assert t == pytest.approx(pair_quantile(embs), abs=1e-6)  # N < dup_sample: every pair
    assert len(res.hits) == K and res.near_duplicate_shortfall == 0 and res.notice is None
    assert res.dup_threshold == t and res.hits[0].id == "img-0007"
    hit_embs = embs[[int(h.id[4:]) for h in res.hits]]
    assert (hit_embs @ hit_embs.T)[np.triu_indices(K, 1)].max() < t


def test_spread_collection_keeps_the_configured_threshold(open_store):
    rng = np.random.default_rng(2)
    embs = unit(rng.standard_normal((N, DIM)))
    embs[1] = embs[0]  # an exact duplicate of image 0
    embs[2] = unit(embs[0] + 0.04 * rng.standard_normal(DIM))  # cosine ~0.99: near one
    assert 0.98 <= float(embs[2] @ embs[0]) < 0.999
    store, catalog = open_store(embs)
    with SearchPipeline(catalog, store, SearchConfig(caps={})) as pipe:
        assert pipe.dup_threshold("image") == 0.98
        res = pipe.search("image", embs[0], k=K)
    got = [h.id for h in res.hits]
    assert len(got) == K and got[0] in ("img-0000", "img-0001")
    assert "img-0000" not in got[1:] and "img-0001" not in got[1:] and "img-0002" not in got
    reasons = dict(res.skipped)
    assert reasons["img-0002"] == f"near_duplicate of {got[0]}"
    assert res.dup_threshold == 0.98 and res.near_duplicate_shortfall == 0


def test_threshold_is_cached_until_the_collection_grows(open_store, monkeypatch):
    rng = np.random.default_rng(3)
    store, catalog = open_store(packed(rng))
    pipe = SearchPipeline(catalog, store, SearchConfig(dup_refresh=0.1))
    calls = []
    real = pipe._pair_quantile
    monkeypatch.setattr(pipe, "_pair_quantile", lambda *a: calls.append(a) or real(*a))
    try:
        first = pipe.dup_threshold("image")
        for _ in range(3):
            pipe.search("image", unit(rng.standard_normal((4, DIM))), k=K)
        assert len(calls) == 1  # once, not per query
        store.upsert(records(20, N), unit(rng.standard_normal((20, DIM))))  # +7%: kept
        catalog.sync()
        assert pipe.dup_threshold("image") == first and len(calls) == 1
        store.upsert(records(400, N + 20), unit(rng.standard_normal((400, DIM))))  # spread
        catalog.sync()
        again = pipe.dup_threshold("image")
        assert len(calls) == 2 and again != first
        assert pipe.dup_threshold("image") == again and len(calls) == 2
    finally:
        pipe.close()


def test_sample_is_fixed_seed_and_bounded(open_store):
    store, catalog = open_store(packed(np.random.default_rng(4)))
    cfg = SearchConfig(dup_sample=64)
    with SearchPipeline(catalog, store, cfg) as a, SearchPipeline(catalog, store, cfg) as b:
        ta, tb = a.dup_threshold("image"), b.dup_threshold("image")
    assert ta == tb and 0.98 < ta <= DUP_CEILING
    with SearchPipeline(catalog, store, SearchConfig(dup_threshold=None)) as off:
        assert off.dup_threshold("image") is None
        assert off.search("image", packed(np.random.default_rng(5), 1)[0], k=K).dup_threshold \
            is None


@pytest.mark.parametrize("kwargs, words", [
    ({"dup_quantile": 1.0}, "dup_quantile must be in"),
    ({"dup_sample": 1}, "dup_sample must be >= 2"),
    ({"dup_refresh": -0.5}, "dup_refresh must be finite and >= 0"),
])
def test_config_checks(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SearchConfig(**kwargs)
