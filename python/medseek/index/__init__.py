"""ANN indexes behind one ``Index`` interface, and the SQLite store they are derived from.

- ``Index`` (base.py): the contract; ``FaissIndex`` (faiss_index.py) and ``MilvusIndex``
  (milvus_index.py) implement it; ``make_index``/``load_index`` pick one by config
  (``FaissConfig`` or ``MilvusConfig``, faiss_config.py).
- ``Store`` (store.py): items, provenance and embeddings in SQLite (WAL); the truth.
  ``Store.reader()`` gives a ``StoreReader`` (reader.py): reads by row key and by parent on
  read-only connections, for searching. All SQL over the store's tables lives in this
  package (sql.py builds the shared statements from one column definition, records.py).
- ``Catalog`` (catalog.py): one index per collection, caught up from the store's changelog.

``faiss`` and ``pymilvus`` are imported lazily (only the indexes and ``Catalog`` need them),
so the store works on machines without them.
"""

from .base import Index, exact_search
from .records import COLLECTIONS, ItemRecord, StoreConfig, StoredItem, UpsertResult
from .reader import Candidates, ChildRow, StoreReader
from .store import Store

__all__ = [
    "COLLECTIONS", "Candidates", "Catalog", "ChildRow", "CatalogConfig", "FaissConfig", "FaissIndex", "Index",
    "IndexFileError", "ItemRecord", "MilvusConfig", "MilvusIndex", "Store", "StoreConfig",
    "StoreReader", "StoredItem", "SyncReport", "UpsertResult", "exact_search", "load_index", "make_index",
]

_LAZY = {
    "FaissConfig": "faiss_config", "FaissIndex": "faiss_index", "IndexFileError": "faiss_config",
    "Catalog": "catalog", "CatalogConfig": "catalog", "SyncReport": "catalog",
    "MilvusConfig": "faiss_config", "MilvusIndex": "milvus_index",
    "make_index": "faiss_config", "load_index": "faiss_config",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
