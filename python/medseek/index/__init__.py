"""ANN indexes behind one ``Index`` interface, and the SQLite store they are derived from.

- ``Index`` (base.py): the contract; ``FaissIndex`` (faiss_index.py) implements it.
- ``Store`` (store.py): items, provenance and embeddings in SQLite (WAL); the truth.
- ``Catalog`` (catalog.py): one index per collection, caught up from the store's changelog.

``faiss`` is imported lazily (only ``FaissIndex``/``Catalog`` need it), so the store works
on machines without it.
"""

from .base import Index, exact_search
from .records import COLLECTIONS, ItemRecord, StoreConfig, StoredItem, UpsertResult
from .store import Store

__all__ = [
    "COLLECTIONS", "Catalog", "CatalogConfig", "FaissConfig", "FaissIndex", "Index",
    "IndexFileError", "ItemRecord", "Store", "StoreConfig", "StoredItem", "SyncReport",
    "UpsertResult", "exact_search",
]

_LAZY = {
    "FaissConfig": "faiss_config", "FaissIndex": "faiss_index", "IndexFileError": "faiss_config",
    "Catalog": "catalog", "CatalogConfig": "catalog", "SyncReport": "catalog",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
