"""StoreReader: candidates by row key, items by id, children by parent, and its per-thread
read-only connections, on a real SQLite store."""

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.index.reader import StoreReader


@pytest.fixture
def store(tmp_path):
    s = Store(StoreConfig(tmp_path / "s.db"))
    s.upsert([ItemRecord("a", "image", patient_pseudonym="P1", study_pseudonym="S1",
                         source_document="D1"),
              ItemRecord("b", "image", labels=("fracture",)),
              ItemRecord("v", "volume")], np.eye(3, dtype=np.float32))
    s.upsert([ItemRecord("a/r", "region", parent_id="a", region="distal_radius"),
              ItemRecord("a/u", "region", parent_id="a", region="distal_ulna"),
              ItemRecord("v/liver", "region", parent_id="v", region="liver", z_range=(3, 9)),
              ItemRecord("v/c0", "chunk", parent_id="v", z_range=(0, 7))],
             np.eye(4, dtype=np.float32)[:, :4])
    yield s
    s.close()


def test_candidates_follow_the_asked_order_and_skip_unknown_keys(store):
    keys = {k: it.row_key for k, it in store.get(["a", "b", "v"]).items()}
    with StoreReader(store) as reader:
        c = reader.candidates(np.array([keys["b"], 999, keys["a"]]))
    assert c.ids == ["b", "a"] and c.positions.tolist() == [0, 2]
    assert c.row_keys.tolist() == [keys["b"], keys["a"]]
    assert c.provenance == {"patient": [None, "P1"], "study": [None, "S1"],
                            "document": [None, "D1"]}
    np.testing.assert_array_equal(c.embeddings, np.eye(3, dtype=np.float32)[[1, 0]])
    assert "P1" not in repr(c)


def test_items_and_children(store):
    key_a = store.get(["a"])["a"].row_key
    with StoreReader(store) as reader:
        items = reader.items(np.array([key_a, 12345]), with_embeddings=True)
        assert items[0].record == store.get(["a"])["a"].record and items[1] is None
        np.testing.assert_array_equal(items[0].embedding, [1, 0, 0])
        kids = reader.children(["a", "v", "b"], "region")
        assert {p: [c.id for c in rows] for p, rows in kids.items()} == {
            "a": ["a/r", "a/u"], "v": ["v/liver"]}
        radius = reader.children(["a", "v"], "region", "distal_radius")
        assert list(radius) == ["a"] and radius["a"][0].region == "distal_radius"
        chunks = reader.children(["v"], "chunk")
        assert chunks["v"][0].z_range == (0, 7)
        assert kids["v"][0].z_range == (3, 9)
        store.delete(["a"])  # committed writes are visible to the reader at once
        assert reader.items(np.array([key_a]))[0] is None
        assert reader.children(["a"], "region") == {}
        with pytest.raises(TypeError, match="parent_ids must be a sequence of str"):
            reader.children("a", "region")


def test_by_ids_reads_what_store_get_reads(store):
    with StoreReader(store) as reader:
        got = reader.by_ids(["v", "nope", "a", "a", "a/r"], with_embeddings=True)
        expected = store.get(["v", "a", "a/r"], with_embeddings=True)
        assert set(got) == {"v", "a", "a/r"}  # unknown ids absent, a repeat read once
        for item_id, it in got.items():
            assert it == expected[item_id]  # record, row key, seq, timestamps
            np.testing.assert_array_equal(it.embedding, expected[item_id].embedding)
        assert got["a"].record.patient_pseudonym == "P1"
        np.testing.assert_array_equal(got["a/r"].embedding, [1, 0, 0, 0])
        plain = reader.by_ids(("b",))
        assert plain["b"].record.labels == ("fracture",) and plain["b"].embedding is None
        assert reader.by_ids("b").keys() == {"b"}  # a lone str is one id, as in Store.get
        assert reader.by_ids([]) == {} and reader.by_ids(["nope"]) == {}
        with pytest.raises(TypeError, match="ids must be a str or a sequence of str"):
            reader.by_ids(["a", 1])


def test_each_thread_reads_through_its_own_read_only_connection(store):
    with StoreReader(store) as reader:
        here = reader._con_here()
        assert reader._con_here() is here  # one per thread, kept
        with ThreadPoolExecutor(2) as pool:
            barrier = threading.Barrier(2)

            def read_in_thread(_):
                barrier.wait(timeout=10)  # both threads live at once: no thread reuse
                return reader._con_here(), reader.by_ids(["a", "b"]).keys()

            (c1, k1), (c2, k2) = pool.map(read_in_thread, range(2))
        assert len({id(here), id(c1), id(c2)}) == 3
        assert k1 == k2 == {"a", "b"}
        # a read through it cannot write, whatever the SQL
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            here.execute("DELETE FROM items")
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            c1.execute("UPDATE items SET labels = '[]'")
        assert set(store.get(["a", "b", "v"])) == {"a", "b", "v"}


def test_reads_see_each_commit_and_never_block_the_writer(store):
    with StoreReader(store) as reader, ThreadPoolExecutor(1) as other:
        assert reader.by_ids(["a"])["a"].record.labels == ()
        assert other.submit(reader.by_ids, ["new"]).result() == {}  # both connections open
        store.upsert([ItemRecord("a", "image", labels=("effusion",)),
                      ItemRecord("new", "image")], np.eye(3, dtype=np.float32)[[2, 1]])
        for read in (reader.by_ids, lambda ids: other.submit(reader.by_ids, ids).result()):
            got = read(["a", "new"])
            assert got["a"].record.labels == ("effusion",) and "new" in got
        key_new = reader.by_ids(["new"])["new"].row_key
        np.testing.assert_array_equal(
            reader.items(np.array([key_new]), with_embeddings=True)[0].embedding, [0, 1, 0])
        # a reader in the middle of a read transaction does not hold the writer up (WAL)
        con = reader._con_here()
        con.execute("BEGIN")
        assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 8
        store.delete(["new"])
        assert con.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 8  # its snapshot
        con.execute("COMMIT")
        assert reader.by_ids(["new"]) == {}


def test_close_closes_every_threads_connection(store):
    reader = StoreReader(store)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(reader.by_ids, ["a"]).result()  # opens that thread's connection
        reader.close()
        with pytest.raises(sqlite3.ProgrammingError):
            pool.submit(reader.by_ids, ["a"]).result()
    with pytest.raises(sqlite3.ProgrammingError):
        reader.by_ids(["a"])
    with ThreadPoolExecutor(1) as pool, pytest.raises(sqlite3.ProgrammingError,
                                                      match="closed StoreReader"):
        pool.submit(reader.by_ids, ["a"]).result()  # a thread that never read before
    assert set(store.get(["a"])) == {"a"}  # the store itself is untouched
