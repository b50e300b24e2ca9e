"""The region/diversify read path without per-candidate store reads (issue 14), each fast
path against the store read it replaces, on a real SQLite store and real FAISS indexes:

* ``FaissIndex.stored_vectors`` (flat, HNSW) returns the vectors added, bit for bit, after
  upserts, removals, an HNSW rebuild and save/load; None for IVF-PQ and absent ids;
* ``StoreReader.candidates(index_vectors=...)`` (ids and provenance from the ``RowCache``,
  vectors from the index) equals the plain store read after upserts, moves, deletes, a
  pruned changelog and with the index behind the store, and reads each row only once;
* ``StoreReader.children(cached=True)`` equals the uncached read after children are
  added, deleted, and their parent deleted;
* ``SearchPipeline.finish`` answers exactly as with every candidate read from the store;
* ``diversify_checked`` on batch-wide group codes picks exactly as ``diversify`` on the
  pseudonyms.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medseek.index.catalog import Catalog, CatalogConfig
from medseek.index.faiss_index import FaissConfig, FaissIndex
from medseek.index.reader import StoreReader
from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.search.diversify import diversify, diversify_checked, group_codes
from medseek.search.explain import ConceptBank
from medseek.search.pipeline import SearchPipeline
from medseek.search.query import QueryOptions, RegionQuery, SearchConfig

pytestmark = pytest.mark.usefixtures("one_faiss_thread")
DIM = 16


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=-1, keepdims=True),
                                dtype=np.float32)


# -- FaissIndex.stored_vectors ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_stored_vectors_are_the_vectors_added(kind, tmp_path):
    rng = np.random.default_rng(1)
    index = FaissIndex(DIM, FaissConfig(kind=kind, hnsw_rebuild_fraction=0.3))
    ids = np.arange(100, 160, dtype=np.int64)
    vecs = unit(rng.standard_normal((60, DIM)))
    index.add(ids, vecs)
    want = dict(zip(ids.tolist(), vecs))
    ask = np.array([150, 100, 133, 150], dtype=np.int64)  # any order, repeats allowed
    np.testing.assert_array_equal(index.stored_vectors(ask), np.stack([want[i] for i in ask]))
    # upsert a few (new vectors), remove others (flat compacts; HNSW tombstones, then past
    # the dead fraction rebuilds), add new ids: every position moves or may move
    new = unit(rng.standard_normal((5, DIM)))
    index.add(ids[:5], new)
    want.update(zip(ids[:5].tolist(), new))
    np.testing.assert_array_equal(index.stored_vectors(ids), np.stack([want[i] for i in ids]))
    gone = ids[10:30]
    index.remove(gone)
    after = ids[30:]  # positions moved (flat compacts): still the right rows
    np.testing.assert_array_equal(index.stored_vectors(after),
                                  np.stack([want[i] for i in after.tolist()]))
    extra = unit(rng.standard_normal((3, DIM)))
    index.add(np.array([7, 8, 9], dtype=np.int64), extra)
    want.update(zip([7, 8, 9], extra))
    for i in gone.tolist():
        del want[i]
    live = np.array(sorted(want), dtype=np.int64)
    np.testing.assert_array_equal(index.stored_vectors(live), np.stack([want[i] for i in live]))
    assert index.stored_vectors(np.array([100, 12], dtype=np.int64)) is None  # 12: absent
    assert index.stored_vectors(gone[:1]) is None  # removed
    assert index.stored_vectors(np.empty(0, np.int64)).shape == (0, DIM)
    index.save(tmp_path / "x.npz")
    loaded = FaissIndex.load(tmp_path / "x.npz")
    np.testing.assert_array_equal(loaded.stored_vectors(live[::-1]),
                                  np.stack([want[i] for i in live[::-1]]))
    with pytest.raises(TypeError, match="int64"):
        index.stored_vectors(np.array([1.5]))


def test_stored_vectors_of_ivfpq_is_none():
    rng = np.random.default_rng(2)
    index = FaissIndex(DIM, FaissConfig(kind="ivfpq", nlist=4, m=4, nbits=4))
    index.train(unit(rng.standard_normal((index.config.min_train, DIM))))
    index.add(np.arange(50, dtype=np.int64), unit(rng.standard_normal((50, DIM))))
    assert index.stored_vectors(np.array([3], dtype=np.int64)) is None


# -- StoreReader through the RowCache ---------------------------------------------------
def image(i: int, **kw) -> ItemRecord:
    return ItemRecord(f"img-{i:03d}", "image", patient_pseudonym=f"P{i // 3}",
                      study_pseudonym=None if i % 5 == 0 else f"S{i // 2}",
                      source_document=f"D{i // 4}", **kw)


@pytest.fixture
def indexed(tmp_path):
    rng = np.random.default_rng(3)
    store = Store(StoreConfig(tmp_path / "s.db"))
    store.upsert([image(i) for i in range(40)], unit(rng.standard_normal((40, DIM))))
    catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / "index"))
    catalog.open()
    reader = StoreReader(store)
    yield store, catalog, reader, rng
    reader.close()
    store.close()


def same_candidates(a, b) -> None:
    assert a.row_keys.tolist() == b.row_keys.tolist()
    assert a.positions.tolist() == b.positions.tolist()
    assert (a.ids, a.collections, a.provenance) == (b.ids, b.collections, b.provenance)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


def check_groups(c) -> None:
    """Equal provenance values have equal codes, None is -1."""
    for key, values in c.provenance.items():
        codes = c.groups[key]
        for i, v in enumerate(values):
            assert (codes[i] == -1) == (v is None)
            assert all((codes[i] == codes[j]) == (v == w)
                       for j, w in enumerate(values) if v is not None and w is not None)


def test_cached_candidates_equal_the_store_read_through_writes(indexed):
    store, catalog, reader, rng = indexed
    from_index = lambda keys: catalog.stored_vectors("image", keys)  # noqa: E731
    key = {it.record.id: it.row_key for it in store.get([f"img-{i:03d}" for i in range(40)]
                                                         ).values()}
    asked = np.array(sorted(key.values())[::-1] + [10_000], dtype=np.int64)

    def check():
        fast = reader.candidates(asked, index_vectors=from_index)
        same_candidates(fast, reader.candidates(asked))
        return fast

    fast = check()
    assert fast.groups is not None and len(fast.ids) == 40
    check_groups(fast)
    assert reader.row_cache.reads == 40
    check()
    assert reader.row_cache.reads == 40  # nothing read again: no write since
    # new provenance and a new vector for one item, the index not yet caught up: the
    # index's copy is older than the store's, so everything comes from the store
    store.upsert([image(4, labels=("x",))], unit(rng.standard_normal((1, DIM))))
    store.upsert([dataclasses.replace(image(7), patient_pseudonym="P-new")],
                 store.get(["img-007"], with_embeddings=True)["img-007"].embedding[None])
    assert check().groups is None
    catalog.sync()
    assert check().groups is not None
    assert reader.row_cache.reads == 40 + 2  # only the two rewritten rows read again
    # moved to another collection, deleted: dropped or in the other collection, as stored
    moved = store.get(["img-011"], with_embeddings=True)["img-011"]
    store.upsert([dataclasses.replace(moved.record, collection="report")],
                 moved.embedding[None])
    store.delete(["img-012", "img-013"])
    fast = check()  # the moved row is newer than the index: the store read
    assert fast.groups is None
    assert "img-012" not in fast.ids and fast.collections[fast.ids.index("img-011")] == "report"
    catalog.sync()
    assert check().groups is None  # the image index no longer holds img-011: store read
    survivors = asked[np.isin(asked, [key["img-011"], key["img-012"], key["img-013"]],
                              invert=True)]
    fast = reader.candidates(survivors, index_vectors=from_index)
    same_candidates(fast, reader.candidates(survivors))
    assert fast.groups is not None and "img-011" not in fast.ids
    # a deleted row the index still holds (not synced): dropped through the cache
    store.delete(["img-014"])
    fast = reader.candidates(survivors, index_vectors=from_index)
    same_candidates(fast, reader.candidates(survivors))
    assert fast.groups is not None and "img-014" not in fast.ids
    # the changelog pruned past the cache's seq: the cache starts over, still right
    store.upsert([image(20)], unit(rng.standard_normal((1, DIM))))
    store.prune_changelog(store.last_seq())
    catalog = Catalog(store, CatalogConfig(index_dir=catalog.config.index_dir))
    catalog.open()  # rebuilt: its saved seq is below the pruned changelog
    reads = reader.row_cache.reads
    survivors = survivors[survivors != key["img-014"]]
    fast = reader.candidates(survivors, index_vectors=lambda k: catalog.stored_vectors(
        "image", k))
    same_candidates(fast, reader.candidates(survivors))
    assert fast.groups is not None and reader.row_cache.reads == reads + 36


def test_a_new_reader_on_a_reopened_store_starts_empty_and_agrees(indexed, tmp_path):
    store, catalog, reader, _ = indexed
    keys = np.array(sorted(store.filter_row_keys("image")), dtype=np.int64)
    reader.candidates(keys, index_vectors=lambda k: catalog.stored_vectors("image", k))
    store.close()
    again = Store(StoreConfig(tmp_path / "s.db"))
    try:
        again.delete(["img-000"])
        with StoreReader(again) as fresh:
            assert len(fresh.row_cache) == 0
            got = fresh.candidates(keys, index_vectors=lambda k: (
                np.stack([catalog.index("image").stored_vectors(k[i:i + 1])[0]
                          for i in range(k.size)]), again.last_seq()))
            same_candidates(got, fresh.candidates(keys))
            assert "img-000" not in got.ids and len(fresh.row_cache) == 39
        assert len(fresh.row_cache) == 0  # closing the reader lets go of its rows
        # the old reader catches up with the delete made through another connection
        assert "img-000" not in reader.candidates(
            keys, index_vectors=lambda k: catalog.stored_vectors("image", k)).ids
    finally:
        again.close()


def store_with_crops(tmp_path, seed: int, n: int, cropped: tuple[int, ...]):
    """A store of ``n`` images with a "radius" region child ``r<i>`` of each image ``i``
    in ``cropped``, and the random generator that made their vectors."""
    rng = np.random.default_rng(seed)
    store = Store(StoreConfig(tmp_path / "s.db"))
    store.upsert([image(i) for i in range(n)], unit(rng.standard_normal((n, DIM))))
    store.upsert([ItemRecord(f"r{i}", "region", parent_id=f"img-{i:03d}", region="radius")
                  for i in cropped], unit(rng.standard_normal((len(cropped), DIM))))
    return store, rng


def test_cached_children_follow_writes_to_children_and_parents(tmp_path):
    store, rng = store_with_crops(tmp_path, 4, 6, (0, 1, 2))
    parents = [f"img-{i:03d}" for i in range(6)] + ["unknown"]
    with StoreReader(store) as reader:
        def check(region="radius"):
            got = reader.children(parents, "region", region, cached=True)
            want = reader.children(parents, "region", region)
            assert {p: [(c.id, c.z_range) for c in rows] for p, rows in got.items()} == {
                p: [(c.id, c.z_range) for c in rows] for p, rows in want.items()}
            for p in got:
                for a, b in zip(got[p], want[p]):
                    np.testing.assert_array_equal(a.embedding, b.embedding)
            return got

        assert list(check()) == parents[:3]
        check(None)
        # a second crop for a parent that had none, one for a parent that had one
        store.upsert([ItemRecord("r4", "region", parent_id="img-004", region="radius",
                                 z_range=(1, 3)),
                      ItemRecord("r0b", "region", parent_id="img-000", region="radius")],
                     unit(rng.standard_normal((2, DIM))))
        assert [c.id for c in check()["img-000"]] == ["r0", "r0b"]
        store.delete(["r1"])
        assert "img-001" not in check()
        store.delete(["img-002"])  # the parent: its children go with it
        assert "img-002" not in check()
        store.upsert([image(5)], unit(rng.standard_normal((1, DIM))))  # a parent write
        check()
    store.close()


def test_per_parent_values_are_kept_until_a_write_in_their_collections(tmp_path):
    store, rng = store_with_crops(tmp_path, 6, 4, (0, 1))
    parents = [f"img-{i:03d}" for i in range(4)]
    asked: list[list[str]] = []

    def compute(need):  # parent -> how many region children it has (none: absent)
        asked.append(sorted(need))
        kids = reader.children(need, "region", "radius", cached=True)
        return {pid: len(rows) for pid, rows in kids.items()}

    with StoreReader(store) as reader:
        def values():
            return reader.per_parent(("n", "radius"), ("region", "chunk"), parents, compute)

        assert values() == {"img-000": 1, "img-001": 1} and asked == [parents]
        assert values() == {"img-000": 1, "img-001": 1} and len(asked) == 1  # kept
        store.upsert([image(3)], unit(rng.standard_normal((1, DIM))))  # another collection
        assert values() == {"img-000": 1, "img-001": 1} and len(asked) == 1
        store.upsert([ItemRecord("r3", "region", parent_id="img-003", region="radius")],
                     unit(rng.standard_normal((1, DIM))))
        assert values() == {"img-000": 1, "img-001": 1, "img-003": 1} and len(asked) == 2
        store.upsert([ItemRecord("c0", "chunk", parent_id="img-000", z_range=(0, 4))],
                     unit(rng.standard_normal((1, DIM))))
        values()
        assert len(asked) == 3  # a chunk write drops them too
        store.delete(["r0"])
        assert values() == {"img-001": 1, "img-003": 1} and asked[-1] == parents
    store.close()


# -- the pipeline ----------------------------------------------------------------------
@pytest.fixture
def corpus(tmp_path):
    """240 images in 8 clusters; region crops for two thirds of them (a few with two);
    some volumes-like items whose region has a z-range and chunk children."""
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((8, DIM)))
    n = 240
    embs = unit(centres[np.arange(n) % 8] + 0.35 * rng.standard_normal((n, DIM)))
    store = Store(StoreConfig(tmp_path / "s.db"))
    store.upsert([image(i) for i in range(n)], embs)
    kids = [i for i in range(n) if i % 3]
    store.upsert([ItemRecord(f"r{i}", "region", parent_id=f"img-{i:03d}", region="radius",
                             z_range=(2, 6) if i % 10 == 1 else None) for i in kids],
                 unit(embs[kids] + 0.3 * rng.standard_normal((len(kids), DIM))))
    twice = kids[::7]
    store.upsert([ItemRecord(f"r{i}b", "region", parent_id=f"img-{i:03d}", region="radius")
                  for i in twice], unit(rng.standard_normal((len(twice), DIM))))
    zs = [i for i in kids if i % 10 == 1]
    store.upsert([ItemRecord(f"c{i}-{j}", "chunk", parent_id=f"img-{i:03d}",
                             z_range=(4 * j, 4 * j + 4)) for i in zs for j in range(2)],
                 unit(rng.standard_normal((2 * len(zs), DIM))))
    catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / "index"))
    catalog.open()
    names = tuple(f"concept-{i}" for i in range(5))
    bank = ConceptBank(names, unit(rng.standard_normal((5, DIM))))
    pipe = SearchPipeline(catalog, store, SearchConfig(k_prime=60), concepts=bank)
    yield pipe, store, catalog, embs, rng
    pipe.close()
    store.close()


def answers(results) -> list:
    return [[(h.id, h.score, h.global_score, h.region_score, h.region_id, h.relaxed,
              h.record, h.explanation) for h in r.hits]
            + [r.skipped, r.stale, r.candidates, r.near_duplicate_shortfall]
            for r in results]


def test_finish_answers_as_with_every_candidate_read_from_the_store(corpus, monkeypatch):
    pipe, store, catalog, embs, rng = corpus
    queries = embs[[0, 13, 77, 150, 201]]
    region = RegionQuery("radius", unit(queries + 0.2 * rng.standard_normal(queries.shape)))
    cases = [(None, True), (region, False), (region, True)]

    def run():
        return [answers(pipe.finish(pipe.ann("image", queries, options=QueryOptions(
            k=8, diversify=div)), reg)) for reg, div in cases]

    def from_store():  # every candidate and child read from the store
        with monkeypatch.context() as m:
            m.setattr(catalog, "stored_vectors", lambda c, k: (None, 0))
            m.setattr(pipe.reader.row_cache, "children",
                      lambda con, ids, coll, name, read: read(ids))
            m.setattr(pipe.reader.row_cache, "per_parent",  # region vectors resolved anew
                      lambda con, key, colls, ids, compute: compute(ids))
            return run()

    fast = run()
    assert pipe.reader.row_cache.reads > 0 and len(pipe.reader.row_cache)
    assert fast == from_store()
    assert any(h[3] is not None for r in fast[1] for h in r[:-4])  # regions matched
    assert any(r[-4] for r in fast[0])  # diversification skipped some
    # writes between searches: a region child and an image rewritten, one image deleted;
    # one rewritten child is the matched region of a hit (its kept region vector goes)
    hit_id, kid_id = next((h[0], h[4]) for h in fast[1][0][:-4] if h[4] is not None)
    store.upsert([ItemRecord("r1", "region", parent_id="img-001", region="radius"),
                  ItemRecord(kid_id, "region", parent_id=hit_id, region="radius")],
                 unit(rng.standard_normal((2, DIM))))
    store.upsert([dataclasses.replace(image(13), patient_pseudonym="P-other")],
                 embs[13:14])
    store.delete(["img-077"])
    behind = run()  # the index is behind the store: store reads where they must be
    assert behind == from_store()
    assert any(r[-3] for case in behind for r in case)  # img-077: stale, dropped
    catalog.sync()
    synced = run()
    assert synced == from_store()
    assert synced != behind
    assert all(h[0] != "img-077" for case in synced for r in case for h in r[:-4])


# -- diversify on batch group codes ------------------------------------------------------
def test_group_codes_code_equal_values_alike_and_none_as_minus_one():
    codes = group_codes(["a", None, "b", "a", None, "c", "b"])
    assert codes.dtype == np.int64 and codes.tolist() == [0, -1, 1, 0, -1, 2, 1]
    assert group_codes([]).shape == (0,)
    with pytest.raises(TypeError, match="str or None, got 3"):
        group_codes(["a", 3])
    with pytest.raises(TypeError, match="sequence of str"):
        group_codes("ab")


@pytest.mark.parametrize("seed", range(6))
def test_diversify_checked_equals_diversify_on_the_pseudonyms(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 120))
    centres = unit(rng.standard_normal((4, DIM)))
    embs = unit(centres[rng.integers(0, 4, n)] + 0.15 * rng.standard_normal((n, DIM)))
    embs[1] = embs[0]  # an exact duplicate
    scores = np.sort(rng.uniform(0.2, 0.9, n))[::-1]
    prov = {key: [None if rng.random() < 0.2 else f"{key}{rng.integers(0, m)}"
                  for _ in range(n)]
            for key, m in (("patient", 6), ("study", 12), ("document", 9))}
    # codes as a batch would give them: coded over more rows than this query's
    batch = {key: group_codes(values + ["other"] * 5)[:n] + 0 for key, values in prov.items()}
    batch = {key: np.where(c >= 0, c + 7, -1) for key, c in batch.items()}  # any codes
    caps = {"patient": 1, "study": 1, "document": 2}
    for lam, dup, relax, k in [(0.7, 0.98, False, 10), (0.5, None, True, 30),
                               (1.0, 0.9, True, n), (0.0, 0.99, False, 3)]:
        want = diversify(scores, embs, prov, k, lam, caps, dup, relax_caps=relax)
        got = diversify_checked(scores, embs, batch, k, lam, caps, dup, relax_caps=relax)
        assert got.selected.tolist() == want.selected.tolist()
        assert got.mmr.tolist() == want.mmr.tolist()
        assert got.relaxed.tolist() == want.relaxed.tolist()
        assert got.skipped == want.skipped
    assert want.skipped and got.selected.size
    with pytest.raises(ValueError, match="caps names 'site'"):
        diversify_checked(scores, embs, batch, 3, 0.7, {"site": 1}, None)
