"""The repository's ``kernels/`` folder must never stand in for a top-level ``kernels``.

The folder ships as ``medseek.kernels``; at the root of a clone it is also a package named
plain ``kernels``, the name of Hugging Face's kernel hub package, which transformers
imports. Whenever the clone's root is on ``sys.path`` (``python -m pytest`` or
``python -c`` from the root puts it there), ``import kernels`` finds the folder instead
and transformers fails with an ImportError far from the cause. These tests fail first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPO_KERNELS = REPO / "kernels"


def _path_entries() -> list[Path]:
    # "" on sys.path means the current directory at import time
    return [Path(p or os.getcwd()).resolve() for p in sys.path]


def test_no_sys_path_entry_exposes_the_repository_kernels_folder():
    shadowing = [str(p) for p in _path_entries() if (p / "kernels").resolve() == REPO_KERNELS]
    assert not shadowing, (
        f"{shadowing} on sys.path makes {REPO_KERNELS} importable as top-level 'kernels'; "
        "run the tests with plain `pytest` (see .ci/run), not `python -m pytest`")


def test_top_level_kernels_is_never_the_repository_folder():
    spec = importlib.util.find_spec("kernels")
    if spec is not None and spec.origin is not None:
        assert REPO_KERNELS not in Path(spec.origin).resolve().parents
    loaded = sys.modules.get("kernels")
    if loaded is not None and getattr(loaded, "__file__", None):
        assert REPO_KERNELS not in Path(loaded.__file__).resolve().parents
