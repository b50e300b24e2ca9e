"""StoreReader: candidates by row key and children by parent, on a real SQLite store."""

import numpy as np
import pytest

from medseek.index.records import ItemRecord, StoreConfig
from medseek.index.store import Store
from medseek.search.store_reads import StoreReader


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
