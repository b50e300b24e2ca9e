"""Python's cyclic GC in a server process (``medseek.serve.server.tune_gc_for_serving``).

``serve`` (the command's, and each worker's, main) freezes what start-up built and raises
generation 0's threshold once the server is listening; ``ServerThread`` (tests, the demo)
shares its interpreter and must leave the GC alone. The first is checked in a real server
process started by the test, the second in this one.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.server import GC_THRESHOLD0, ServerThread  # noqa: E402


class HashEncoder:
    """Texts -> unit vectors seeded by their hash (the server encodes its concept prompts
    at start-up, nothing else here)."""

    dim = 32

    def encode_texts(self, texts):
        import hashlib

        import numpy as np

        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
                 for t in texts]
        v = np.stack([np.random.default_rng(s).standard_normal(self.dim) for s in seeds])
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


_SERVER = textwrap.dedent("""
    import gc, json, os, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[2])
    from test_serve_gc import HashEncoder

    from medseek.serve.config import ServeConfig
    from medseek.serve.server import serve

    before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}

    def ready(server, port):
        after = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
        print(json.dumps({"before": before, "after": after}), flush=True)
        os._exit(0)  # what was asked is read; nothing to shut down for

    root = Path(sys.argv[1])
    serve(ServeConfig(store_path=root / "store.db", index_dir=root / "index", port=0,
                      metrics_port=None, grace_s=1.0), HashEncoder(), ready)
""")


def test_a_server_process_freezes_start_up_and_raises_the_young_threshold(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SERVER, str(tmp_path),
                           str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["before"]["threshold"][0] != GC_THRESHOLD0  # Python's own until then
    assert got["after"]["threshold"][0] == GC_THRESHOLD0
    assert got["after"]["threshold"][1:] == got["before"]["threshold"][1:]
    # what start-up imported and built (modules, store, pipeline, ...) is frozen
    assert got["after"]["frozen"] > got["before"]["frozen"] + 1000


def test_an_in_process_server_leaves_the_interpreters_gc_alone(tmp_path):
    threshold, frozen = gc.get_threshold(), gc.get_freeze_count()
    cfg = ServeConfig(store_path=tmp_path / "store.db", index_dir=tmp_path / "index", port=0,
                      metrics_port=None, grace_s=1.0)
    with ServerThread(cfg, HashEncoder()) as s:
        assert s.port > 0
        assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == frozen
