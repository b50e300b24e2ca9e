"""Metadata filters as Milvus expressions, consistency and index-build state, on a real
milvus-lite database, checked against the SQLite store and FAISS exact flat."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'medseek[milvus]')")
lite = pytest.importorskip("milvus_lite.server_manager",
                           reason="milvus-lite is not installed (pip install 'medseek[milvus]')")

from medseek.index.catalog import Catalog, CatalogConfig  # noqa: E402
from medseek.index.faiss_config import FaissConfig, MilvusConfig  # noqa: E402
from medseek.index.faiss_index import FaissIndex  # noqa: E402
from medseek.index.milvus_filters import filter_expression, quote  # noqa: E402
from medseek.index.milvus_index import MilvusIndex  # noqa: E402
from medseek.index.records import ItemRecord, StoreConfig  # noqa: E402
from medseek.index.store import Store  # noqa: E402
from medseek.search.pipeline import SearchPipeline  # noqa: E402
from medseek.search.query import QueryOptions, SearchConfig, SearchFilters  # noqa: E402

DIM = 16
#: values that would end or rewrite an expression if pasted in unescaped
HOSTILE = ['" or 1==1', "' or ''=='", 'a\\" or row_key >= 0 or "', "back\\slash\\",
           'tab\there', "new\nline", "cr\rx", "\\n", "é☃𝄞", "", "x\x01y", ") or (true"]


def unit_rows(rng: np.random.Generator, n: int, d: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True))


def records(rng: np.random.Generator, n: int) -> list[ItemRecord]:
    """Items whose metadata mixes ordinary, hostile, empty and missing (None) values."""
    modalities = ["CR", "DX", None, "", *HOSTILE[:4]]
    views = ["PA", "AP", None, *HOSTILE[4:8]]
    labels = ["effusion", "nodule", "cardiomegaly", *HOSTILE[8:]]
    out = []
    for i in range(n):
        out.append(ItemRecord(
            f"item-{i}", "image", modality=modalities[i % len(modalities)],
            body_part=None if i % 5 == 0 else ("chest" if i % 2 else 'hand "left"'),
            view=views[i % len(views)],
            labels=tuple(rng.choice(labels, size=int(rng.integers(0, 3)), replace=False)),
            patient_pseudonym=None if i % 7 == 0 else f'p"{i % 11}\\',
            study_pseudonym=None if i % 3 == 0 else f"s'{i % 13}"))
    return out


FILTERS = [
    SearchFilters(modality="CR"),
    SearchFilters(modality=HOSTILE[:4]),  # every quoting trick at once
    SearchFilters(modality=""),  # the empty string, which is not None
    SearchFilters(view=[HOSTILE[5], HOSTILE[6]], body_part=["chest"]),
    SearchFilters(body_part='hand "left"', labels_any=["nodule", HOSTILE[8]]),
    SearchFilters(labels_any=HOSTILE[8:]),
    SearchFilters(exclude_patients=['p"3\\', 'p"4\\', "nobody"]),
    SearchFilters(exclude_studies=["s'1", "s'2"], modality=["CR", "DX", ""]),
    SearchFilters(modality=[]),  # an empty list matches nothing
    SearchFilters(labels_any=[]),
    SearchFilters(exclude_patients=[]),  # an empty exclusion excludes nothing
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store of 240 items, its Milvus catalog (milvus-lite) and a FAISS flat reference."""
    tmp = tmp_path_factory.mktemp("milvus_filters")
    config = MilvusConfig(uri=str(tmp / "filters.db"))
    rng = np.random.default_rng(21)
    store = Store(StoreConfig(tmp / "store.db"))
    vectors = unit_rows(rng, 240)
    store.upsert(records(rng, 240), vectors)
    catalog = Catalog(store, CatalogConfig(index_dir=tmp / "ix", faiss=config))
    catalog.open()
    faiss = FaissIndex(DIM, FaissConfig(kind="flat"))
    keys = store.filter_row_keys("image")
    faiss.add(keys, np.ascontiguousarray(vectors[np.argsort(keys)]))  # keys sorted = insertion
    yield store, catalog, faiss, config
    store.close()
    catalog.index("image").close()
    lite.server_manager_instance.release_server(config.uri)


def test_quote_escapes_every_breakout():
    assert quote('" or 1==1') == '"\\" or 1==1"'
    assert quote("a\\") == '"a\\\\"'
    assert quote("l1\nl2\r\t") == '"l1\\nl2\\r\\t"'
    for value in HOSTILE:
        body = quote(value)[1:-1]
        # no unescaped quote inside: every '"' is preceded by an odd run of backslashes
        for at in [i for i, ch in enumerate(body) if ch == '"']:
            run = len(body[:at]) - len(body[:at].rstrip("\\"))
            assert run % 2 == 1, (value, body)
    with pytest.raises(TypeError, match="must be a str"):
        quote(3)
    with pytest.raises(ValueError, match="not valid Unicode"):
        quote("\ud800")


def test_expression_shape():
    assert filter_expression(SearchFilters()) == ""
    assert filter_expression(SearchFilters(modality=[])) is None
    expr = filter_expression({"modality": "CR", "exclude_patients": ["p1"]})
    assert expr.startswith('(modality in ["=CR"]) and (patient_sha256 not in ["')
    assert "p1" not in expr  # pseudonyms travel as digests only
    with pytest.raises(ValueError, match="unknown names"):
        filter_expression({"modalty": "CR"})
    with pytest.raises(TypeError, match="must be a str or a sequence of str"):
        filter_expression(SearchFilters(modality=[3]))


@pytest.mark.parametrize("filters", FILTERS, ids=range(len(FILTERS)))
def test_filtered_search_equals_the_store_filtered_faiss_path(world, filters):
    store, catalog, faiss, _ = world
    index = catalog.index("image")
    assert isinstance(index, MilvusIndex) and index.supports_filters
    queries = unit_rows(np.random.default_rng(22), 5)
    allowed = store.filter_row_keys("image", **filters.as_kwargs())
    fs, fi = faiss.search(queries, 30, allowed)
    ms, mi = index.search(queries, 30, filters=filters)
    np.testing.assert_array_equal(mi, fi)
    np.testing.assert_allclose(ms, fs, rtol=0, atol=2e-6)
    # a filter that keeps fewer than k rows returns exactly those rows
    if allowed.size < 30:
        assert sorted(mi[0][mi[0] >= 0].tolist()) == allowed.tolist()


def test_hostile_value_matches_only_itself(world):
    store, catalog, _, _ = world
    index = catalog.index("image")
    queries = unit_rows(np.random.default_rng(23), 1)
    for value in HOSTILE[:4] + [""]:
        _, ids = index.search(queries, 240, filters=SearchFilters(modality=value))
        got = ids[0][ids[0] >= 0]
        want = store.filter_row_keys("image", modality=value)
        assert want.size > 0 and sorted(got.tolist()) == want.tolist(), value


def test_pipeline_sends_filters_to_milvus_and_faiss_keeps_ids(world, tmp_path):
    store, catalog, _, config = world
    pipeline = SearchPipeline(catalog, store, SearchConfig(k_prime=40, k=10))
    opts = QueryOptions(k=10, filters=SearchFilters(modality="CR"), diversify=False)
    queries = unit_rows(np.random.default_rng(24), 3)
    cr = store.filter_row_keys("image", modality="CR")
    batch = pipeline.ann("image", queries, options=opts)
    assert np.isin(batch.keys[batch.keys >= 0], cr).all()
    # The index holds metadata of its own: change an item's modality in the store without
    # catching the index up, and the native path still filters by the index's copy, while
    # the store's id list would not. (The store re-read in ``finish`` drops nothing here:
    # the item is live; it is the filter that differs.)
    moved = store.reader().items(cr[:1])[0]
    vec = np.ascontiguousarray(store.get([moved.record.id], with_embeddings=True)[
        moved.record.id].embedding[None, :])
    store.upsert([ItemRecord(moved.record.id, "image", modality="MR")], vec)
    try:
        hit = pipeline.ann("image", vec, options=opts)
        assert hit.keys[0, 0] == moved.row_key  # still "CR" in Milvus until the catch-up
        catalog.sync("image")
        after = pipeline.ann("image", vec, options=opts)
        assert moved.row_key not in after.keys[0].tolist()
    finally:
        store.upsert([moved.record], vec)
        catalog.sync("image")
    pipeline.close()


def test_stale_rows_never_reach_a_result(world):
    """The store is the truth: a row the index still holds (a Bounded read, or a catch-up
    not run yet) but the store deleted is dropped by the pipeline and counted stale."""
    store, catalog, _, _ = world
    pipeline = SearchPipeline(catalog, store, SearchConfig(k_prime=20, k=5))
    victim = store.get(["item-17"], with_embeddings=True)["item-17"]
    query = np.ascontiguousarray(victim.embedding[None, :])
    opts = QueryOptions(k=5, diversify=False, explain=False)
    before = pipeline.search("image", query, options=opts)[0]
    assert before.hits[0].id == "item-17"
    store.delete(["item-17"])  # the index is not caught up
    try:
        _, ids = catalog.search("image", query, 1)
        assert ids[0, 0] == victim.row_key  # Milvus still has it
        after = pipeline.search("image", query, options=opts)[0]
        assert "item-17" not in [h.id for h in after.hits] and after.stale >= 1
        filtered = pipeline.search("image", query, options=QueryOptions(
            k=5, diversify=False, explain=False, filters=SearchFilters(
                modality=victim.record.modality)))[0]
        assert "item-17" not in [h.id for h in filtered.hits]
    finally:
        store.upsert([victim.record], query)
        catalog.sync("image")
    pipeline.close()


def test_rows_without_metadata_refuse_filters(world):
    config = world[3]
    rng = np.random.default_rng(25)
    with MilvusIndex(DIM, config, "bare") as index:
        assert index.supports_filters  # empty
        index.add(np.arange(4, dtype=np.int64), unit_rows(rng, 4))
        assert not index.supports_filters
        with pytest.raises(ValueError, match="added without metadata"):
            index.search(unit_rows(rng, 1), 2, filters=SearchFilters(modality="CR"))
        _, ids = index.search(unit_rows(rng, 1), 4, filters=SearchFilters())  # no filter: fine
        assert (ids >= 0).all()
        # re-adding them with metadata makes the collection filterable again
        index.add(np.arange(4, dtype=np.int64), unit_rows(rng, 4),
                  metadata=[ItemRecord(f"i{i}", "image", modality="CR") for i in range(4)])
        assert index.supports_filters
        _, ids = index.search(unit_rows(rng, 1), 4, filters=SearchFilters(modality="CR"))
        assert sorted(ids[0].tolist()) == [0, 1, 2, 3]


def test_metadata_is_checked_before_anything_is_written(world):
    config = world[3]
    rng = np.random.default_rng(26)
    small = MilvusConfig(uri=config.uri, max_value_length=8, max_labels=2)
    with MilvusIndex(DIM, small, "limits") as index:
        ids = np.array([1, 2], dtype=np.int64)
        with pytest.raises(ValueError, match="row_key 2: view is longer than"):
            index.add(ids, unit_rows(rng, 2), metadata=[
                ItemRecord("a", "image"), ItemRecord("b", "image", view="x" * 9)])
        with pytest.raises(ValueError, match="row_key 1 has 3 labels"):
            index.add(ids, unit_rows(rng, 2), metadata=[
                ItemRecord("a", "image", labels=("p", "q", "r")), ItemRecord("b", "image")])
        with pytest.raises(ValueError, match="metadata has 1 records but ids has 2"):
            index.add(ids, unit_rows(rng, 2), metadata=[ItemRecord("a", "image")])
        assert len(index) == 0


def test_consistency_and_index_state(world, caplog):
    config = world[3]
    rng = np.random.default_rng(27)
    with pytest.raises(ValueError, match="consistency_level must be one of"):
        MilvusConfig(uri=config.uri, consistency_level="strong")
    eager = MilvusConfig(uri=config.uri, index_wait_rows=50)
    with MilvusIndex(DIM, eager, "state") as index:
        assert index.scores_exact  # FLAT
        with caplog.at_level(logging.INFO, logger="medseek.index.milvus_index"):
            index.add(np.arange(60, dtype=np.int64), unit_rows(rng, 60))  # >= 50: waits
        assert "FLAT index of Milvus collection medseek_state built over 60 rows" in caplog.text
        state = index.index_state()
        assert state.built and state.total_rows == 60 and not state.failed
        queries = unit_rows(rng, 2)
        strong = index.search(queries, 5, consistency_level="Strong")
        bounded = index.search(queries, 5)
        np.testing.assert_array_equal(strong[1], bounded[1])
        with pytest.raises(ValueError, match="consistency_level must be one of"):
            index.search(queries, 5, consistency_level="Sometimes")
