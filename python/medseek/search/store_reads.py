"""Moved to :mod:`medseek.index.reader` (``Store.reader()``); this name stays for old imports."""

from medseek.index.reader import Candidates, ChildRow, StoreReader

__all__ = ["Candidates", "ChildRow", "StoreReader"]
