"""SearchPipeline end to end on a real SQLite store and FAISS catalog in tmp_path."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medseek.index.catalog import Catalog, CatalogConfig
from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.search.diagnose import diagnose
from medseek.search.explain import ConceptBank
from medseek.search.pipeline import SearchPipeline
from medseek.search.query import RegionQuery, SearchConfig, SearchFilters

DIM, RDIM, N = 16, 8, 200


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def orthogonal_to(q, rng, n):
    u = rng.standard_normal((n, q.size))
    u -= np.outer(u @ q, q)
    return unit(u)


def build_corpus(rng):
    """Images whose cosine to QUERY strictly falls with the index (angle .3 + .006 i)."""
    query = unit(rng.standard_normal(DIM))
    u = orthogonal_to(query.astype(np.float64), rng, N)
    u[1] = u[0]  # image 1 is a near-duplicate of image 0 (cos 0.99998)
    t = 0.3 + 0.006 * np.arange(N)
    embs = unit(np.cos(t)[:, None] * query + np.sin(t)[:, None] * u)
    records = [ItemRecord(
        f"img-{i:03d}", "image", modality="DX" if i % 5 == 0 else "CR", body_part="wrist",
        view="PA", labels=("fracture",) if i % 3 == 0 else (),
        patient_pseudonym=f"P{i // 4}" if i < 160 else None, study_pseudonym=f"S{i // 2}",
        source_document=f"D{(i // 4) % 5}") for i in range(N)]
    # region children: every image but i % 6 == 5; the query's radius is QR. Image 2's
    # radius matches it exactly, image 0's is orthogonal to it, image 3 has two crops.
    qr = unit(rng.standard_normal(RDIM))
    with_region = [i for i in range(N) if i % 6 != 5]
    remb = unit(rng.standard_normal((len(with_region), RDIM)))
    pos = {i: n for n, i in enumerate(with_region)}
    remb[pos[2]] = qr
    remb[pos[0]] = orthogonal_to(qr.astype(np.float64), rng, 1)[0]
    regions = [ItemRecord(f"img-{i:03d}/radius", "region", parent_id=f"img-{i:03d}",
                          region="distal_radius") for i in with_region]
    regions.append(ItemRecord("img-003/radius-b", "region", parent_id="img-003",
                              region="distal_radius"))
    remb = np.vstack([remb, unit(0.9 * qr + 0.1 * orthogonal_to(qr.astype(np.float64), rng, 1)[0])])
    # a distractor region name on image 0 that matches QR exactly: must be ignored
    regions.append(ItemRecord("img-000/ulna", "region", parent_id="img-000", region="distal_ulna"))
    remb = np.vstack([remb, qr[None]])
    return query, embs, records, qr, regions, remb


@pytest.fixture
def env(tmp_path):
    rng = np.random.default_rng(2024)
    query, embs, records, qr, regions, remb = build_corpus(rng)
    store = Store(StoreConfig(tmp_path / "store.db"))
    store.upsert(records, embs)
    store.upsert(regions, remb)
    catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / "indexes"))
    catalog.open()
    data = dict(query=query, embs=embs, records=records, qr=qr, regions=regions, remb=remb)
    with SearchPipeline(catalog, store, SearchConfig()) as pipe:
        yield pipe, store, catalog, data
    store.close()


def ids(result):
    return [h.id for h in result.hits]


def brute_force(data, keep, k):
    sims = data["embs"] @ data["query"]
    order = [i for i in np.argsort(-sims, kind="stable") if keep(data["records"][i])]
    return [f"img-{i:03d}" for i in order[:k]]


def test_plain_search_is_exact_top_k(env):
    pipe, _, _, data = env
    res = pipe.search("image", data["query"], k=10, diversify=False)
    assert ids(res) == [f"img-{i:03d}" for i in range(10)]
    assert res.candidates == 200 and res.stale == 0
    np.testing.assert_allclose([h.global_score for h in res.hits],
                               np.cos(0.3 + 0.006 * np.arange(10)), atol=1e-5)
    assert set(res.timings) == {"filter", "ann", "fetch", "rerank", "diversify", "explain",
                                "total"}
    assert all(v >= 0 for v in res.timings.values())
    assert res.timings["total"] >= res.timings["ann"]
    # retrieval-based diagnosis from the hits: images 0, 3, 6, 9 carry "fracture"
    scores = np.array([h.score for h in res.hits])
    labels = [h.record.labels for h in res.hits]
    assert diagnose(scores, labels, k=10) == {"fracture": pytest.approx(0.4)}
    assert diagnose(scores, labels, k=1) == {"fracture": 1.0}


def test_filters_go_into_the_ann_search(env):
    pipe, store, catalog, data = env
    # K' = k = 10: post-filtering 10 candidates would leave 2 DX images, not 10
    narrow = SearchPipeline(catalog, store, SearchConfig(k_prime=10, k=10))
    dx = narrow.search("image", data["query"], filters=SearchFilters(modality="DX"),
                       diversify=False)
    unfiltered = narrow.search("image", data["query"], diversify=False)
    narrow.close()
    assert ids(dx) != ids(unfiltered)
    assert ids(dx) == brute_force(data, lambda r: r.modality == "DX", 10)
    assert all(h.record.modality == "DX" for h in dx.hits)
    excluded = [f"P{p}" for p in range(6)]
    res = pipe.search("image", data["query"], k=30, diversify=False,
                      filters=SearchFilters(exclude_patients=excluded, labels_any=["fracture"]))
    assert ids(res) == brute_force(
        data, lambda r: r.patient_pseudonym not in excluded and "fracture" in r.labels, 30)
    assert not {h.patient_pseudonym for h in res.hits} & set(excluded)
    assert pipe.search("image", data["query"], filters=SearchFilters(modality="MR")).hits == []
    studies = pipe.search("image", data["query"], k=10, diversify=False,
                          filters=SearchFilters(exclude_studies=["S0", "S1"]))
    assert ids(studies)[0] == "img-004"


def test_region_rerank_changes_the_order(env):
    pipe, _, _, data = env
    region = RegionQuery("distal_radius", data["qr"])
    plain = pipe.search("image", data["query"], k=10, diversify=False)
    same = dataclasses.replace(pipe.config, rerank_alpha=0.0)
    pipe.config = same
    zero = pipe.search("image", data["query"], k=10, region=region, diversify=False)
    assert ids(zero) == ids(plain)
    pipe.config = dataclasses.replace(same, rerank_alpha=0.5)
    res = pipe.search("image", data["query"], k=N, region=region, diversify=False)
    assert ids(res)[:10] != ids(plain)
    assert ids(res)[0] == "img-002" and res.hits[0].region_score == pytest.approx(1.0, abs=1e-6)
    # expected order from the ingested vectors: 0.5 * region cos + 0.5 * global cos; a
    # missing region (i % 6 == 5) counts as the mean region cos less 0.1 (all 200 images
    # are candidates); image 3: its better crop counts
    g = (data["embs"] @ data["query"]).astype(np.float64)
    r = np.full(N, np.nan)
    for rec, e in zip(data["regions"], data["remb"]):
        if rec.region == "distal_radius":
            i = int(rec.parent_id[4:])
            r[i] = np.fmax(r[i], e.astype(np.float64) @ data["qr"].astype(np.float64))
    imputed = np.nanmean(r) - 0.1
    mixed = 0.5 * np.where(np.isnan(r), imputed, r) + 0.5 * g
    assert ids(res) == [f"img-{i:03d}" for i in np.argsort(-mixed, kind="stable")]
    assert res.hits[1].id == "img-003" and res.hits[1].region_id == "img-003/radius-b"
    missing = [h for h in res.hits if h.region_score is None]
    assert missing and all(
        h.matched_region is None and h.score == pytest.approx(0.5 * imputed + 0.5 * h.global_score)
        for h in missing)
    assert all(h.matched_region == "distal_radius" for h in res.hits if h.region_score is not None)


def test_diversification_caps_hold(env):
    pipe, _, _, data = env
    plain = pipe.search("image", data["query"], k=10, diversify=False)
    assert len({h.patient_pseudonym for h in plain.hits}) < 10  # caps have work to do
    res = pipe.search("image", data["query"], k=10)
    assert len(res.hits) == 10
    for attr, cap in (("patient_pseudonym", 1), ("study_pseudonym", 1), ("source_document", 2)):
        values = [getattr(h, attr) for h in res.hits if getattr(h, attr) is not None]
        assert max(values.count(v) for v in values) <= cap
    assert ("img-001", "near_duplicate of img-000") in res.skipped
    assert ("img-002", "cap:patient of img-000") in res.skipped
    # 5 documents x cap 2 = at most 10 hits with a patient; k=12 returns fewer unless relaxed
    assert len(pipe.search("image", data["query"], k=12).hits) == 10
    pipe.config = dataclasses.replace(pipe.config, relax_caps=True)
    relaxed = pipe.search("image", data["query"], k=12)
    assert len(relaxed.hits) == 12 and [h.relaxed for h in relaxed.hits][-2:] == [True, True]


def test_deleted_items_never_returned(env):
    pipe, store, catalog, data = env
    store.delete(["img-000", "img-004", "img-005"])  # also deletes their region children
    res = pipe.search("image", data["query"], k=10, diversify=False)  # index not caught up
    assert res.stale == 3
    assert ids(res) == [f"img-{i:03d}" for i in (1, 2, 3, 6, 7, 8, 9, 10, 11, 12)]
    filtered = pipe.search("image", data["query"], k=10, diversify=False,
                           filters=SearchFilters(modality="CR"))
    assert filtered.stale == 0 and "img-004" not in ids(filtered)
    catalog.sync()
    assert pipe.search("image", data["query"], k=10, diversify=False).stale == 0


def test_batch_queries_and_explanations(env):
    pipe, store, catalog, data = env
    names = ("near_query", "far")
    bank = ConceptBank(names, np.vstack([data["query"], data["embs"][-1]]))
    with SearchPipeline(catalog, store, pipe.config, concepts=bank) as explained:
        single = explained.search("image", data["query"], k=5)
        batch = explained.search("image", np.vstack([data["query"], data["embs"][50]]), k=5)
    assert ids(batch[0]) == ids(single)
    assert ids(batch[1])[0] == "img-050"
    assert single.hits[0].explanation[0].concept == "near_query"
    assert "P0" not in repr(single.hits[0])  # pseudonyms stay out of logs


def test_volume_organ_rerank_uses_chunks(tmp_path):
    rng = np.random.default_rng(5)
    q = unit(rng.standard_normal(DIM))
    t = (0.2 + 0.05 * np.arange(6))[:, None]
    g = unit(np.cos(t) * q + np.sin(t) * orthogonal_to(q.astype(np.float64), rng, 6))
    basis = np.eye(RDIM, dtype=np.float32)
    store = Store(StoreConfig(tmp_path / "v.db"))
    store.upsert([ItemRecord(f"vol-{j}", "volume", modality="CT") for j in range(6)], g)
    chunks, cemb = [], []
    for j in range(6):
        for c, z in enumerate(((0, 10), (10, 20), (20, 30))):  # half-open
            chunks.append(ItemRecord(f"vol-{j}/c{c}", "chunk", parent_id=f"vol-{j}", z_range=z))
            cemb.append(basis[(j + c) % 3])  # chunk c of volume j points along axis (j+c)%3
    store.upsert(chunks, np.array(cemb))
    # liver z-ranges: vol-1's chunk 1 -> axis 2 (the query organ axis); its own region
    # embedding points away, so only the chunk path can rank it first. vol-5: no liver.
    livers = [(0, 10), (10, 20), (0, 10), (20, 30), (0, 30)]
    store.upsert([ItemRecord(f"vol-{j}/liver", "region", parent_id=f"vol-{j}", region="liver",
                             z_range=z) for j, z in enumerate(livers)],
                 np.tile(basis[5], (5, 1)))
    catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / "idx"))
    catalog.open()
    cfg = SearchConfig(k_prime=6, k=6, rerank_alpha=0.8)
    with SearchPipeline(catalog, store, cfg) as pipe:
        plain = pipe.search("volume", q, diversify=False)
        res = pipe.search("volume", q, region=RegionQuery("liver", basis[2]), diversify=False)
    store.close()
    assert ids(plain) == [f"vol-{j}" for j in range(6)]
    # organ cosines: vol-0 chunk0 axis0 -> 0; vol-1 chunk1 axis2 -> 1; vol-2 chunk0 axis2
    # -> 1; vol-3 chunk2 axis2 -> 1; vol-4 all chunks equal weight -> 1/sqrt(3); vol-5 none
    organ = {h.id: h.region_score for h in res.hits}
    assert organ["vol-0"] == pytest.approx(0.0, abs=1e-6)
    assert organ["vol-1"] == organ["vol-2"] == organ["vol-3"] == pytest.approx(1.0, abs=1e-6)
    assert organ["vol-4"] == pytest.approx(3 ** -0.5, abs=1e-6) and organ["vol-5"] is None
    # 0.8 * organ + 0.2 * global; vol-5 gets the mean organ cos (0.716) less 0.1:
    # 0.8 * 0.616 + 0.2 cos(0.45) = 0.67, above vol-4's 0.8 / sqrt(3) + 0.2 cos(0.4) = 0.65
    assert ids(res) == ["vol-1", "vol-2", "vol-3", "vol-5", "vol-4", "vol-0"]


def test_config_and_query_errors(env):
    pipe, _, _, data = env
    with pytest.raises(ValueError, match=r"k must be <= k_prime \(200\), got 300"):
        SearchConfig(k=300)
    with pytest.raises(ValueError, match=r"caps keys must be among .* got \['site'\]"):
        SearchConfig(caps={"site": 1})
    with pytest.raises(ValueError, match="rerank_alpha must be in"):
        SearchConfig(rerank_alpha=2.0)
    with pytest.raises(ValueError, match="embedding must be L2-normalised: row 0"):
        RegionQuery("distal_radius", np.ones(RDIM, dtype=np.float32))
    wrong_dim = RegionQuery("distal_radius", unit(np.ones(RDIM + 1)))
    with pytest.raises(ValueError, match="region.embedding has dim 9 but the region embeddings"):
        pipe.search("image", data["query"], region=wrong_dim)
    two = RegionQuery("distal_radius", np.vstack([data["qr"], data["qr"]]))
    with pytest.raises(ValueError, match=r"one row per query \(1\)"):
        pipe.search("image", data["query"], region=two)
    with pytest.raises(ValueError, match="collection 'volume' has no index"):
        pipe.search("volume", data["query"])


def _same_results(a, b):
    """Every field but the timings (hits compare exactly: ids, scores, records, ...)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.hits and x.hits == y.hits
        assert dataclasses.replace(x, timings={}) == dataclasses.replace(y, timings={})


def test_ann_then_finish_on_other_threads_is_search(env):
    pipe, store, catalog, data = env
    rng = np.random.default_rng(7)
    queries = np.vstack([data["query"], data["embs"][50],
                         unit(data["query"] + 0.3 * rng.standard_normal(DIM))])
    other_qr = unit(rng.standard_normal(RDIM))
    bank = ConceptBank(("near_query", "far"), np.vstack([data["query"], data["embs"][-1]]))
    cases = [  # (filters, region, diversify)
        (None, None, False),
        (None, None, True),
        (SearchFilters(labels_any=["fracture"]), None, True),
        (SearchFilters(exclude_patients=["P0", "P1"]), None, False),
        (None, RegionQuery("distal_radius", data["qr"]), False),
        (None, RegionQuery("distal_radius", np.vstack([data["qr"], other_qr, data["qr"]])),
         True),
        (SearchFilters(modality="CR"), RegionQuery("distal_radius", data["qr"]), True),
    ]
    with SearchPipeline(catalog, store, pipe.config, concepts=bank) as p, \
            ThreadPoolExecutor(1) as index_thread, ThreadPoolExecutor(1) as search_thread:
        for filters, region, diversify in cases:
            expected = p.search("image", queries, k=8, filters=filters, region=region,
                                diversify=diversify)
            batch = index_thread.submit(p.ann, "image", queries, 8, filters).result()
            got = search_thread.submit(p.finish, batch, region, diversify).result()
            _same_results(got, expected)
            assert all(len(r.hits) == 8 and r.stale == 0 for r in got)
            assert got[0].hits[0].explanation is not None
            if region is None:
                assert ids(got[0]) != ids(got[1])  # the queries do differ
            if filters is not None and filters.modality == "CR":
                assert all(h.record.modality == "CR" for r in got for h in r.hits)
            # the batch's shared reads give each query what it gets alone
            for qi, r in enumerate(got):
                reg = region
                if region is not None and region.embedding.ndim == 2:
                    reg = RegionQuery(region.name, region.embedding[qi])
                alone = p.search("image", queries[qi], k=8, filters=filters, region=reg,
                                 diversify=diversify)
                assert ids(r) == ids(alone) and r.skipped == alone.skipped
                assert [h.region_id for h in r.hits] == [h.region_id for h in alone.hits]
                np.testing.assert_allclose([h.score for h in r.hits],
                                           [h.score for h in alone.hits], rtol=1e-6)
        # ann's defaults are search's: k = config.k, no filters
        default = p.finish(p.ann("image", queries[:1]))
        _same_results(default, [p.search("image", queries[0])])
        assert len(default[0].hits) == p.config.k


def test_finish_drops_rows_deleted_after_the_ann(env, monkeypatch):
    pipe, store, catalog, data = env
    queries = np.vstack([data["query"], data["embs"][50]])
    region = RegionQuery("distal_radius", data["qr"])
    before = pipe.finish(pipe.ann("image", queries, 10), diversify=False)
    cases = [(None, False), (region, False), (None, True), (region, True)]
    batches = [pipe.ann("image", queries, 10) for _ in cases]
    gone = {"img-000", "img-002", "img-050", "img-051"}
    assert gone & set(ids(before[0])) and "img-050" in ids(before[1])
    store.delete(sorted(gone))  # acknowledged between the ANN and the store reads
    # a new item takes no deleted row key: it is not what the stale keys point at
    store.upsert([ItemRecord("img-new", "image")], data["query"][None])
    for (reg, div), batch in zip(cases, batches):
        res = pipe.finish(batch, reg, diversify=div)
        for r in res:
            assert not gone & set(ids(r)) and "img-new" not in ids(r)
            assert r.stale == len(gone) and r.candidates == N - len(gone)
            assert len(r.hits) == 10
        if reg is None and not div:  # the survivors in their order
            assert ids(res[0]) == [f"img-{i:03d}" for i in (1, 3, 4, 5, 6, 7, 8, 9, 10, 11)]
    # deleted between the candidates' store read and the hits' records' read (the index
    # holding no exact vectors, so both come from the store): dropped, counted
    batch = pipe.ann("image", queries[:1], 5)
    read_items, records_at = pipe.reader.items, pipe.reader.records_at

    def delete_then_read(row_keys, **kw):
        store.delete(["img-003"])
        return read_items(row_keys, **kw)

    monkeypatch.setattr(catalog, "stored_vectors", lambda c, k: (None, 0))
    monkeypatch.setattr(pipe.reader, "items", delete_then_read)
    (res,) = pipe.finish(batch, diversify=False)
    assert ids(res) == ["img-001", "img-004", "img-005", "img-006"] and res.stale == 5
    monkeypatch.undo()
    # candidates through the row cache: the hits' records are those of the candidates'
    # read (their seqs), so a delete acknowledged after that read does not tear the
    # answer; the next search drops the row
    batch = pipe.ann("image", queries[:1], 5)

    def delete_then_records(row_keys, seqs):
        store.delete(["img-004"])
        return records_at(row_keys, seqs)

    monkeypatch.setattr(pipe.reader, "records_at", delete_then_records)
    (res,) = pipe.finish(batch, diversify=False)
    assert ids(res) == ["img-001", "img-004", "img-005", "img-006", "img-007"]
    assert res.stale == 5
    monkeypatch.undo()
    (res,) = pipe.finish(pipe.ann("image", queries[:1], 5), diversify=False)
    assert "img-004" not in ids(res) and res.stale == 6
    # every candidate gone: no hit, every key stale
    batch = pipe.ann("image", queries, 10)
    store.delete([f"img-{i:03d}" for i in range(N)] + ["img-new"])
    empty = pipe.finish(batch, region, diversify=True)
    assert [(r.hits, r.candidates, r.stale) for r in empty] == [([], 0, N)] * 2  # not synced


def test_finish_drops_rows_moved_to_another_collection_after_the_ann(env):
    pipe, store, _, data = env
    batch = pipe.ann("image", data["query"][None], 5)
    moved = store.get(["img-001"], with_embeddings=True)["img-001"]
    store.upsert([dataclasses.replace(moved.record, collection="report")],
                 moved.embedding[None])
    assert store.get(["img-001"])["img-001"].row_key == moved.row_key  # same key, moved
    (res,) = pipe.finish(batch, diversify=False)
    # the other candidates fill in: K' = 200 were fetched for k = 5
    assert ids(res) == ["img-000", "img-002", "img-003", "img-004", "img-005"]
    assert res.stale == 1 and res.candidates == N - 1


def test_the_mmr_weight_is_a_per_call_option_and_caches_nothing(env):
    import gc

    from medseek.search.query import QueryOptions

    pipe, _, _, data = env

    def run(lam):
        return pipe.search("image", data["query"], options=QueryOptions(k=10, mmr_lambda=lam))

    # the option does change the result (relevance only vs. mostly diversity)
    assert ids(run(1.0)) != ids(run(0.05))
    assert ids(run(pipe.config.lam)) == ids(pipe.search("image", data["query"], k=10))
    run(0.5)
    pipelines = sum(type(o) is SearchPipeline for o in gc.get_objects())
    dup_cache = dict(pipe._dup_cache)
    state = {name: len(v) for name, v in vars(pipe).items() if isinstance(v, (dict, list))}
    for lam in np.linspace(0.0, 1.0, 60):
        assert len(run(float(lam)).hits) == 10
    assert sum(type(o) is SearchPipeline for o in gc.get_objects()) == pipelines
    assert pipe._dup_cache == dup_cache and len(dup_cache) == 1
    assert {name: len(v) for name, v in vars(pipe).items()
            if isinstance(v, (dict, list))} == state
    with pytest.raises(TypeError, match="give options or k, not both"):
        pipe.search("image", data["query"], k=3, options=QueryOptions(k=3))
