"""The lighter request path (issue 14): each shortcut against the longer way it replaced.

* ``explain_pairs`` (every hit of a batch explained in one call) against ``explain`` per
  query;
* ``StoreReader.candidate_items`` (candidates and records in one read) against
  ``candidates`` + ``items``, with deleted rows;
* ``StoreReader.records_at`` (the hits' records at the candidates' seqs, from the record
  cache) against ``items``;
* a warm batch (candidates from the row cache and the index's vectors, records from the
  record cache: one changelog statement) against the store-read path, through writes;
* ``item_id`` queries resolved inside the search micro-batch (one store read for the
  batch, items of several collections searched group by group, an unknown id or a
  missing region failing only its own request) against the same queries one at a time,
  through a real gRPC server;
* the batcher's wake-ups: a batch of one key still closes as soon as it is full while
  requests of another key arrive, and never merges the keys.
"""

from __future__ import annotations

import asyncio
import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medseek.index.catalog import Catalog, CatalogConfig
from medseek.index.reader import StoreReader
from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.search.explain import ConceptBank, concept_scores, explain, explain_pairs
from medseek.search.pipeline import SearchPipeline
from medseek.search.query import QueryOptions, SearchConfig
from medseek.serve.batcher import MicroBatcher
from medseek.serve.config import BatchConfig

pytestmark = pytest.mark.usefixtures("one_faiss_thread")
DIM, N_IMAGES = 16, 60


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


# -- explanations -----------------------------------------------------------------------
@pytest.mark.parametrize("n_concepts,top", [(1, 3), (5, 2), (14, 3), (9, 20)])
def test_explain_pairs_equals_explain_per_query(n_concepts, top):
    rng = np.random.default_rng(n_concepts)
    names = [f"c{i}" for i in range(n_concepts)]
    counts = [0, 3, 1, 7]  # hits per query, one query without hits
    queries = rng.normal(0, 0.2, (len(counts), n_concepts))
    hits = rng.normal(0, 0.2, (sum(counts), n_concepts))
    queries[1, :2] = hits[0, :2] = 0.3  # equal contributions: ties go by concept order
    hits[-1] = -0.5  # this hit shares no concept
    owner = np.repeat(np.arange(len(counts)), counts)
    got = explain_pairs(queries[owner], hits, names, top, min_score=0.05)
    want, start = [], 0
    for qi, n in enumerate(counts):
        want += explain(queries[qi], hits[start:start + n], names, top, min_score=0.05)
        start += n
    assert got == want
    assert any(got) and not all(got)  # some hits share concepts, some share none
    assert all(len(m) <= top for m in got)


def test_explain_pairs_errors():
    q, h = np.zeros((2, 3)), np.zeros((3, 3))
    with pytest.raises(ValueError, match="must agree on the number of concepts"):
        explain_pairs(q, h, ["a", "b", "c"])
    with pytest.raises(ValueError, match="must agree on the number of concepts"):
        explain_pairs(h, h, ["a", "b"])
    with pytest.raises(ValueError, match="must be finite"):
        explain_pairs(np.full((3, 3), np.nan), h, ["a", "b", "c"])
    with pytest.raises(TypeError, match="numpy float array"):
        explain_pairs([[0.0]], h[:1, :1], ["a"])
    assert explain_pairs(np.zeros((0, 3)), np.zeros((0, 3)), ["a", "b", "c"]) == []


def test_bank_scores_equal_concept_scores_and_still_check_their_input():
    rng = np.random.default_rng(11)
    bank = ConceptBank(("a", "b", "c"), unit(rng.standard_normal((3, DIM))),
                       np.array([0.1, -0.2, 0.0]))
    x = unit(rng.standard_normal((5, DIM)))
    for _ in range(2):  # the second call uses the bank's cached float64 copy
        np.testing.assert_array_equal(bank.scores(x), concept_scores(x, bank.embeddings,
                                                                     bank.baseline))
        np.testing.assert_array_equal(bank.scores(x[0]), concept_scores(
            x[0], bank.embeddings, bank.baseline))
    with pytest.raises(ValueError, match="must have 8 columns"):
        bank.scores(unit(rng.standard_normal((2, 8))))
    with pytest.raises(ValueError, match="embs must be L2-normalised"):
        bank.scores(2 * x)


# -- one store read ---------------------------------------------------------------------
@pytest.fixture
def store_env(tmp_path):
    rng = np.random.default_rng(7)
    embs = unit(rng.standard_normal((N_IMAGES, DIM)))
    records = [ItemRecord(f"img-{i:03d}", "image", modality="CR", view=("PA", "LAT")[i % 2],
                          labels=("fracture",) if i % 3 == 0 else (),
                          patient_pseudonym=f"P{i // 3}", study_pseudonym=f"S{i // 2}",
                          source_document=f"D{i // 5}") for i in range(N_IMAGES)]
    regions = [ItemRecord(f"reg-{i:03d}", "region", parent_id=f"img-{i:03d}",
                          region="distal_radius") for i in range(0, N_IMAGES, 2)]
    store = Store(StoreConfig(tmp_path / "store.db"))
    store.upsert(records, embs)
    store.upsert(regions, unit(rng.standard_normal((len(regions), DIM))))
    yield store, embs
    store.close()


def test_candidate_items_is_candidates_and_items_in_one_read(store_env):
    store, _ = store_env
    got = store.get([f"img-{i:03d}" for i in range(10)])
    keys = {r.record.id: r.row_key for r in got.values()}
    store.delete(["img-004"])
    asked = np.array(sorted(keys.values()) + [10_000], dtype=np.int64)  # one never existed
    with store.reader() as reader:
        cands, items = reader.candidate_items(asked)
        want = reader.candidates(asked)
        want_items = reader.items(want.row_keys, with_embeddings=True)
        empty, none = reader.candidate_items(np.empty(0, np.int64))
    assert keys["img-004"] not in cands.row_keys.tolist() and cands.row_keys.size == 9
    np.testing.assert_array_equal(cands.row_keys, want.row_keys)
    np.testing.assert_array_equal(cands.positions, want.positions)
    np.testing.assert_array_equal(cands.embeddings, want.embeddings)
    assert (cands.ids, cands.collections, cands.provenance) == (
        want.ids, want.collections, want.provenance)
    assert [items[k] for k in want.row_keys.tolist()] == [it.record for it in want_items]
    assert empty.row_keys.size == 0 and empty.embeddings.shape == (0, 0) and none == {}
    with store.reader() as reader, pytest.raises(TypeError, match="row_keys must be a 1-D"):
        reader.candidate_items(np.array([1.5]))


def test_vectors_by_ids_are_the_stored_embeddings(store_env):
    store, embs = store_env
    with store.reader() as reader:
        got = reader.vectors_by_ids(["img-005", "reg-004", "nope", "img-005"])
        full = reader.by_ids(["img-005", "reg-004"], with_embeddings=True)
    assert sorted(got) == ["img-005", "reg-004"]
    for item_id, (collection, vec) in got.items():
        assert collection == full[item_id].record.collection
        np.testing.assert_array_equal(vec, full[item_id].embedding)
    np.testing.assert_array_equal(got["img-005"][1], embs[5])
    with store.reader() as reader, pytest.raises(TypeError, match="ids must be a str or"):
        reader.vectors_by_ids([1])


def test_record_cache_follows_writes_and_deletes(store_env):
    store, embs = store_env
    keys = np.array(sorted(r.row_key for r in store.get(["img-001", "img-002", "img-003"])
                           .values()), dtype=np.int64)
    with store.reader() as reader:
        _, first = reader.candidate_items(keys)
        assert (reader.records.hits, reader.records.misses) == (0, 3)
        _, again = reader.candidate_items(keys)
        assert (reader.records.hits, reader.records.misses) == (3, 3) and again == first
        # rewritten (same id, so same row key, new seq): read anew, never the cached one
        old = first[int(keys[1])]
        store.upsert([ItemRecord("img-002", "image", modality="DX", labels=("effusion",))],
                     embs[2:3])
        store.delete(["img-003"])
        cands, now = reader.candidate_items(keys)
        assert now[int(keys[1])].modality == "DX" and now[int(keys[1])].labels == ("effusion",)
        assert now[int(keys[1])] != old and int(keys[2]) not in now
        assert now[int(keys[0])] is first[int(keys[0])]  # untouched: from the cache
        assert cands.ids == ["img-001", "img-002"]
    small = StoreReader(store, record_cache=2)
    small.candidate_items(keys[:2])
    small.candidate_items(keys[:1])
    assert len(small.records) == 2 and small.records.misses == 2
    small.close()
    with pytest.raises(ValueError, match="maxsize must be >= 0"):
        StoreReader(store, record_cache=-1)


def test_records_at_are_the_rows_at_those_seqs(store_env):
    store, embs = store_env
    with store.reader() as reader:
        keys = np.array(sorted(r.row_key for r in store.get(
            ["img-001", "img-002", "img-003"]).values()), dtype=np.int64)
        cached = reader.row_cache.rows(reader._con_here(), keys)
        first = reader.records_at(cached.row_keys, cached.seqs)  # misses: one store read
        assert first == {it.row_key: it.record for it in reader.items(keys)}
        again = reader.records_at(cached.row_keys, cached.seqs)
        assert all(again[k] is first[k] for k in first)  # the same objects, from the cache
        store.upsert([ItemRecord("img-002", "image", modality="DX")], embs[2:3])
        store.delete(["img-003"])
        # at the old seqs: still cached, so the rows as they were at the candidates' read
        assert reader.records_at(cached.row_keys, cached.seqs) == first
        now = reader.row_cache.rows(reader._con_here(), keys)
        got = reader.records_at(now.row_keys, now.seqs)
        assert sorted(got) == keys[:2].tolist() and got[int(keys[1])].modality == "DX"
        assert got[int(keys[0])] is first[int(keys[0])]
        # a row key at a seq never cached and deleted since: absent, not an error
        assert reader.records_at(keys[2:], np.array([10**9])) == {}


def _trace_reads(reader, statements: list) -> None:
    """Record every statement the reader's connection on this thread runs."""
    reader._con_here().set_trace_callback(statements.append)


@pytest.mark.parametrize("k_prime", [6, 30])
def test_warm_batch_reads_only_the_changelog_and_answers_as_the_store(store_env, tmp_path,
                                                                      monkeypatch, k_prime):
    """Candidates from the row cache and the index, hits' records from the record cache:
    once warm, a batch on a flat index runs one statement (the changelog's last seq), and
    answers as the store-read path does (``stored_vectors`` unavailable), through writes
    and deletes the index has not caught up with."""
    store, embs = store_env
    catalog = Catalog(store, CatalogConfig(index_dir=tmp_path / "index"))
    catalog.open()
    names = tuple(f"concept-{i}" for i in range(6))
    bank = ConceptBank(names, unit(np.random.default_rng(3).standard_normal((6, DIM))))
    queries = embs[[0, 5, 17, 40]]
    with SearchPipeline(catalog, store, SearchConfig(), concepts=bank) as pipe:
        def search():
            return pipe.search("image", queries, options=QueryOptions(
                k=6, k_prime=k_prime, diversify=False))

        def answers(results):
            return [[(h.id, h.score, h.record, h.explanation) for h in r.hits] + [r.stale]
                    for r in results]

        def from_store():
            with monkeypatch.context() as m:
                m.setattr(catalog, "stored_vectors", lambda c, k: (None, 0))
                return answers(search())

        first = answers(search())
        statements: list[str] = []
        _trace_reads(pipe.reader, statements)
        warm = answers(search())
        assert warm == first and len(statements) == 1 and "sqlite_sequence" in statements[0]
        assert warm == from_store()
        assert any(h[3] for r in warm for h in r[:-1])  # explained
        # a rewrite and two deletes the index has not applied: the rewritten row comes
        # from the store (newer than the index), the deleted ones are dropped as stale
        hit = warm[0][0][0]
        gone = {warm[0][1][0], warm[2][0][0]}
        store.upsert([ItemRecord(hit, "image", modality="DX")],
                     store.get([hit], with_embeddings=True)[hit].embedding[None])
        store.delete(sorted(gone))
        behind = answers(search())
        assert behind == from_store()
        assert all(h[0] not in gone for r in behind for h in r[:-1])
        assert sum(r[-1] for r in behind) >= 2
        assert next(h[2] for h in behind[0][:-1] if h[0] == hit).modality == "DX"
        catalog.sync()
        synced = answers(search())
        assert synced == from_store()
        statements.clear()
        assert answers(search()) == synced and len(statements) == 1  # warm again


def test_item_messages_are_built_once_per_record_object():
    from medseek.serve.messages import ItemMessages, item_message

    cache = ItemMessages(maxsize=2)
    a = ItemRecord("img-001", "image", modality="CR", labels=("effusion",),
                   patient_pseudonym="P1")
    b = ItemRecord("img-001", "image", modality="DX")  # the same row, rewritten
    first = cache.get(a)
    assert first == item_message(a) and cache.get(a) is first
    assert cache.get(b) == item_message(b) and cache.get(b) is not first
    equal = ItemRecord("img-001", "image", modality="CR", labels=("effusion",),
                       patient_pseudonym="P1")
    assert cache.get(equal) == first and cache.get(equal) is not first  # identity, not ==
    assert len(cache) == 2  # a went first
    assert cache.get(a) is not first and cache.get(a) == first


# -- item_id queries inside the micro-batch ----------------------------------------------
class HashTextEncoder:
    """Texts -> seeded unit vectors (only the server's concept prompts are encoded)."""

    dim = DIM

    def encode_texts(self, texts):
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
                 for t in texts]
        return unit(np.stack([np.random.default_rng(s).standard_normal(DIM) for s in seeds]))

    def encode_images(self, images):
        raise ValueError("this test encoder encodes texts only")

    def encode_volumes(self, volumes):
        raise ValueError("this test encoder encodes texts only")


def _same_answers(a, b) -> bool:
    """Answers equal but for the last bits of their floats (FAISS's depend on the batch)."""
    import re

    split = re.compile(r"(-?\d+\.\d+(?:e-?\d+)?)")
    pa, pb_ = split.split(str(a)), split.split(str(b))
    return len(pa) == len(pb_) and pa[0::2] == pb_[0::2] and np.allclose(
        np.array(pa[1::2], dtype=float), np.array(pb_[1::2], dtype=float), rtol=0, atol=1e-5)


def _search_all(cfg, reqs_by_round, concurrent: bool):
    """Start a server on ``cfg``, send each round of requests (all at once, or one by one),
    stop it; the answers (or (code, details)) and the search batches each round formed."""
    grpc = pytest.importorskip("grpc")
    from medseek.serve.server import ServerThread
    from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc

    def answer(stub, req):
        try:
            resp = stub.Search(req, timeout=120)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details()
        resp.ClearField("timings_ms")
        return resp

    out, batches = [], []
    with ServerThread(cfg, HashTextEncoder()) as s, grpc.insecure_channel(
            f"127.0.0.1:{s.port}") as ch:
        stub = pb_grpc.RetrievalStub(ch)

        def count():
            return s.server.metrics.registry.get_sample_value(
                "medseek_batch_size_count", {"batcher": "search"}) or 0.0

        for reqs in reqs_by_round:
            before = count()
            if concurrent:
                with ThreadPoolExecutor(len(reqs)) as pool:
                    out.append(list(pool.map(lambda r: answer(stub, r), reqs)))
            else:
                out.append([answer(stub, r) for r in reqs])
            batches.append(count() - before)
        s.stop()
    return out, batches


def test_item_id_queries_share_a_batch_and_answer_as_one_by_one(store_env, tmp_path):
    pytest.importorskip("grpc")
    from medseek.serve.config import ServeConfig
    from medseek.serve.v1 import retrieval_pb2 as pb

    store, _ = store_env
    store.close()  # the servers open the file themselves
    # no collection given: images and regions (their own collection) and an unknown id in
    # one batch; with a region rerank: an item without the region fails alone
    plain = [pb.SearchRequest(item_id=i, k=4, request_id=i)
             for i in ("img-001", "reg-010", "no-such-item", "img-020", "reg-030")]
    region = [pb.SearchRequest(item_id=i, k=4, request_id=i)
              for i in ("img-002", "img-003", "img-004", "img-006", "img-008")]
    for r in region:
        r.region.name = "distal_radius"
    base = dict(store_path=tmp_path / "store.db", index_dir=tmp_path / "idx", port=0,
                metrics_port=None, grace_s=2.0)
    # a window of minutes: a round closes its batch once all five have arrived
    together, batches = _search_all(ServeConfig(**base, search_batch=BatchConfig(
        max_batch=5, max_wait_ms=120_000)), [plain, region], concurrent=True)
    assert batches == [1.0, 1.0], "each round did not form one micro-batch"
    alone, batches = _search_all(ServeConfig(**base, search_batch=BatchConfig(
        max_batch=1, max_wait_ms=0.0)), [plain, region], concurrent=False)
    assert batches == [5.0, 5.0]
    for got_round, want_round in zip(together, alone):
        assert len(got_round) == len(want_round) == 5
        for got, want in zip(got_round, want_round):
            assert _same_answers(got, want), (got, want)
    got = dict(zip([r.request_id for r in plain + region], together[0] + together[1]))
    # each searched in its own collection, the query item left out, the errors its own
    img = got["img-001"]
    assert [h.item.collection for h in img.hits] == ["image"] * 4
    assert "img-001" not in [h.id for h in img.hits] and img.hits[0].concepts
    assert [h.item.collection for h in got["reg-010"].hits] == ["region"] * 4
    assert "reg-010" not in [h.id for h in got["reg-010"].hits]
    assert got["no-such-item"] == ("NOT_FOUND", "item_id: no stored item 'no-such-item'")
    assert got["img-003"] == ("INVALID_ARGUMENT",
                              "region.name: item 'img-003' has no region 'distal_radius'")
    assert all(h.matched_region == "distal_radius" for h in got["img-002"].hits[:1])
    assert len(got["img-004"].hits) == 4


# -- the batcher's wake-ups -------------------------------------------------------------
def test_a_full_batch_closes_while_another_key_trickles_in():
    calls = []

    def run(key, xs):
        calls.append((key, list(xs)))
        return [x * 10 for x in xs]

    async def main():
        with ThreadPoolExecutor(1) as pool:
            # a window of a minute: only a full batch (or close) can end it
            b = MicroBatcher("t", run, BatchConfig(max_batch=3, max_wait_ms=60_000), pool)
            b.start()
            try:
                first = [asyncio.ensure_future(b.submit("a", 1))]
                for i, key in enumerate("bbabab"):  # "a" fills up at its third request
                    await asyncio.sleep(0)
                    first.append(asyncio.ensure_future(b.submit(key, i + 2)))
                done, _ = await asyncio.wait([first[0], first[3], first[5]], timeout=30)
                assert len(done) == 3, "the full batch of key 'a' did not close"
            finally:
                await b.close()  # the rest of "b" goes out on close
            return [f.result() for f in first]

    out = asyncio.run(main())
    assert out == [10, 20, 30, 40, 50, 60, 70]
    assert calls[0] == ("a", [1, 4, 6])
    assert sorted(calls[1:]) == [("b", [2, 3, 5]), ("b", [7])]


@pytest.mark.parametrize("closed_loop", [True, False])
def test_callers_in_flight_count_as_expected_company(monkeypatch, closed_loop):
    """Two callers are in a batch being finished when three others arrive: the new batch
    waits (linger) for the two to come back instead of leaving without them, so a steady
    load stops splitting into small alternating batches; callers that do not come back
    (open loop) hold it only ``RETURN_GRACE_S`` after their answers, not for the linger."""
    import threading
    import types

    from medseek.serve import batcher as batcher_module

    clock = types.SimpleNamespace(t=1000.0)
    monkeypatch.setattr(batcher_module, "time",
                        types.SimpleNamespace(perf_counter=lambda: clock.t))
    runs, finishing, release = [], threading.Event(), threading.Event()

    def ann(key, xs):  # every ANN "takes" a minute: linger may wait up to a minute
        clock.t += 60.0
        runs.append(list(xs))
        return list(xs)

    def finish(key, xs, out):
        if len(runs) == 1:  # the first batch is held until the test lets it go
            finishing.set()
            assert release.wait(10), "the test never released the first batch"
        return [x * 10 for x in out]

    async def main():
        with ThreadPoolExecutor(1) as pool, ThreadPoolExecutor(2) as fpool:
            b = MicroBatcher("t", ann, BatchConfig(max_batch=8, max_wait_ms=0.0, linger=1.0),
                             pool, finish=finish, finish_executor=fpool)
            b.start()
            try:
                async def caller(x):  # closed loop: its next request once answered
                    first = await b.submit("k", x)
                    return [first, await b.submit("k", x + 10)] if closed_loop else first

                callers = [asyncio.ensure_future(caller(x)) for x in (0, 1)]
                assert await asyncio.to_thread(finishing.wait, 10)
                others = [asyncio.ensure_future(b.submit("k", x)) for x in (5, 6, 7)]
                await asyncio.sleep(0.2)  # time enough to leave without them (not awaited)
                assert runs == [[0, 1]], "the batch left without the callers in flight"
                release.set()
                # a wait for the linger (a minute) would time out here
                return await asyncio.wait_for(asyncio.gather(*callers, *others), 10)
            finally:
                release.set()
                await b.close()

    out = asyncio.run(main())
    if closed_loop:
        assert out == [[0, 100], [10, 110], 50, 60, 70]
        assert runs == [[0, 1], [5, 6, 7, 10, 11]]
    else:
        assert out == [0, 10, 50, 60, 70] and runs == [[0, 1], [5, 6, 7]]
