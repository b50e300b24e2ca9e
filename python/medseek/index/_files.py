"""Files of the index package: crash-safe writes of saved indexes, the store's private file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def write_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` to ``path`` as an uncompressed ``.npz``, atomically.

    The data goes to a temporary file beside ``path``, is fsynced, renamed over ``path``,
    and the directory is fsynced: after a crash ``path`` holds the old file or the new
    one, never a mix. (Zip CRCs then let a reader detect later corruption.)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def create_private(path: Path) -> None:
    """Create the store's folder (0700) and file (0600) when missing, so that SQLite
    opens a file only its owner can read (it gives ``-wal`` and ``-shm`` the same mode)."""
    if str(path) == ":memory:" or str(path).startswith("file:"):
        return
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
