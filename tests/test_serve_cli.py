"""``medseek ingest`` (folder and JSONL manifest) and ``medseek query`` (table, PNG contact
sheet) through the real gRPC client against a real server on port 0."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

pytest.importorskip("grpc_health")
from medseek.serve.commands import main  # noqa: E402
from medseek.serve.config import ServeConfig  # noqa: E402
from medseek.serve.local_encoder import LocalTorchEncoder  # noqa: E402
from medseek.serve.server import ServerThread  # noqa: E402

from test_serve_api import png_bytes  # noqa: E402

TOKEN = "cli-token-0123456789"


def test_ingest_folder_and_manifest_then_query_with_contact_sheet(tmp_path, capsys):
    folder = tmp_path / "archive"
    (folder / "cxr").mkdir(parents=True)
    for pattern in ("gradient", "circle", "stripes"):
        (folder / "cxr" / f"{pattern}.png").write_bytes(png_bytes(pattern))
    (folder / "notes.txt").write_text("Moderate cardiomegaly.")
    manifest = tmp_path / "reports.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in (
        {"id": "m1", "text": "Left pleural effusion.", "labels": ["effusion"]},
        {"id": "m2", "path": "archive/cxr/circle.png", "collection": "image", "view": "PA"},
    )))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    cfg = ServeConfig(store_path=tmp_path / "s.db", index_dir=tmp_path / "idx", port=0,
                      tokens=(TOKEN,), grace_s=1.0)
    with ServerThread(cfg, LocalTorchEncoder()) as s:
        common = ["--server", f"127.0.0.1:{s.port}", "--token-file", str(token_file)]
        assert main(["ingest", str(folder), *common, "--batch-size", "2"]) == 0
        assert "4 inserted, 0 updated, 0 duplicates" in capsys.readouterr().out
        assert main(["ingest", str(manifest), *common]) == 0
        assert "1 inserted, 0 updated, 1 duplicates" in capsys.readouterr().out
        sheet = tmp_path / "hits.png"
        assert main(["query", "--image", str(folder / "cxr" / "stripes.png"), "-k", "2",
                     *common, "--png", str(sheet), "--root", str(folder)]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0].split()[:3] == ["#", "id", "score"]
        assert out[1].split()[:2] == ["1", "cxr/stripes.png"]
        with Image.open(sheet) as im:
            assert im.size == (3 * 164, 188)  # query + 2 hits
        assert main(["query", "--text", "pleural effusion", "-k", "1", *common]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:2] == ["1", "m1"]


def test_serve_config_loads_toml_with_secrets_from_files(tmp_path):
    from medseek.serve.config import load_config

    (tmp_path / "tokens").write_text("token-aaaaaaaa\ntoken-bbbbbbbb\n")
    (tmp_path / "deid.key").write_bytes(b"0123456789abcdef0123")
    (tmp_path / "serve.toml").write_text(
        'store_path = "data/store.db"\nindex_dir = "data/index"\nport = 0\n'
        'tokens_file = "tokens"\ndeid_key_file = "deid.key"\n'
        '[encode_batch]\nmax_batch = 8\nmax_wait_ms = 1.5\n[search]\nk = 5\n')
    cfg = load_config(tmp_path / "serve.toml", port=6000)
    assert cfg.store_path == tmp_path / "data" / "store.db" and cfg.port == 6000
    assert cfg.tokens == ("token-aaaaaaaa", "token-bbbbbbbb")
    assert cfg.deid.key == b"0123456789abcdef0123"
    assert (cfg.encode_batch.max_batch, cfg.search.k, cfg.host) == (8, 5, "127.0.0.1")
    assert "token-aaaa" not in repr(cfg) and "0123456789" not in repr(cfg)
    (tmp_path / "bad.toml").write_text('store_path = "s"\nindex_dir = "i"\nprot = 1\n')
    with pytest.raises(ValueError, match="prot"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text('store_path = "s"\nindex_dir = "i"\n'
                                        '[encode_batch]\nmax_queue = 0\n')
    with pytest.raises(ValueError, match="max_queue must be >= 1, got 0"):
        load_config(tmp_path / "bad2.toml")


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_serve_limits_blas_threads_unless_the_user_set_them(monkeypatch, tmp_path):
    import numpy  # noqa: F401 - its OpenBLAS is loaded, as under the medseek CLI
    from threadpoolctl import threadpool_limits

    from medseek.serve import commands

    raised = threadpool_limits(2, user_api="blas")  # so that 1 below is the limit's doing
    try:
        assert _blas_threads() and set(_blas_threads()) == {2}
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")  # the user's choice is kept
        assert commands.limit_blas_threads() is None and set(_blas_threads()) == {2}
        monkeypatch.delenv("OPENBLAS_NUM_THREADS")
        limiters, seen, limit = [], [], commands.limit_blas_threads
        monkeypatch.setattr(commands, "limit_blas_threads",
                            lambda: limiters.append(limit()))  # to undo it afterwards
        monkeypatch.setattr(commands, "encoder_from_args", lambda args: "encoder")
        monkeypatch.setattr("medseek.serve.server.serve", lambda cfg, encoder, ready: seen.append(
            (cfg.port, encoder, _blas_threads(), os.environ.get("OPENBLAS_NUM_THREADS"))))
        assert main(["serve", "--store", str(tmp_path / "s.db"), "--index-dir",
                     str(tmp_path / "idx"), "--port", "0"]) == 0
        try:
            assert len(limiters) == 1 and limiters[0] is not None
            (port, encoder, threads, env), = seen  # the limit holds while the server runs
            assert (port, encoder, env) == (0, "encoder", "1") and set(threads) == {1}
        finally:
            limiters[0].restore_original_limits()
        assert set(_blas_threads()) == {2}
    finally:
        raised.restore_original_limits()
