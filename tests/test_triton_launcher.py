"""The tritonserver launcher: a model that fails to load is quoted in the error, and
``medseek triton start|status|stop`` manage a background server through the pid file.

Both use small hand-made repositories (no ONNX export): a broken image_encoder, and the
text_tokenizer model alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medseek.export.repository import TOKENIZER_RUNNER, ONNX_RUNNER, committed_repository
from medseek.models.text_tower import locate_minilm
from medseek.serve.triton import (TritonServer, TritonServerConfig, TritonStartError,
                                  http_ready, read_pid_file)

CLI = ("import sys, argparse\n"
       "from medseek.export import commands\n"
       "p = argparse.ArgumentParser(); commands.register(p.add_subparsers())\n"
       "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n")


def _model(repo: Path, name: str, runner: str) -> Path:
    src = committed_repository()
    (repo / name).mkdir(parents=True)
    shutil.copy2(src / name / "config.pbtxt", repo / name / "config.pbtxt")
    version = repo / name / "1"
    version.mkdir()
    shutil.copy2(src / runner, version / "model.py")
    return version


def test_failed_model_load_is_quoted(tmp_path):
    version = _model(tmp_path, "image_encoder", ONNX_RUNNER)
    (version / "model.onnx").write_bytes(b"not an onnx file")
    server = TritonServer(TritonServerConfig(tmp_path, startup_timeout=120))
    try:
        with pytest.raises(TritonStartError) as info:
            server.start()
        assert not server.running
    finally:
        server.close()
    message = str(info.value)
    assert "exited with code" in message
    assert "failed to load 'image_encoder'" in message  # which model
    assert "image_encoder/1/model.onnx failed" in message  # and ONNX Runtime's reason
    assert "CudaDriverHelper" not in message  # CPU-host noise left out


def test_config_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="repo_dir must be a model repository folder"):
        TritonServerConfig(tmp_path / "missing")
    with pytest.raises(ValueError, match="grpc_port must be in 1..65535, got 70000"):
        TritonServerConfig(tmp_path, grpc_port=70000)


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_start_status_stop(tmp_path):
    version = _model(tmp_path, "text_tokenizer", TOKENIZER_RUNNER)
    shutil.copy2(locate_minilm() / "tokenizer.json", version / "tokenizer.json")
    (version / "spec.json").write_text(json.dumps({"max_length": 16}))
    started = _cli("triton", "start", "--repo", str(tmp_path))
    info = read_pid_file(tmp_path)
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        assert info is not None and json.loads(started.stdout)["pid"] == info["pid"]
        assert http_ready(f"http://127.0.0.1:{info['http_port']}")
        status = _cli("triton", "status", "--repo", str(tmp_path))
        assert status.returncode == 0 and json.loads(status.stdout)["ready"] is True
        again = _cli("triton", "start", "--repo", str(tmp_path))
        assert again.returncode == 1 and "already running" in again.stderr
        stopped = _cli("triton", "stop", "--repo", str(tmp_path))
        assert stopped.returncode == 0, stopped.stderr
        deadline = time.monotonic() + 120  # only a broken stop waits this long
        while time.monotonic() < deadline and Path(f"/proc/{info['pid']}").exists():
            time.sleep(0.1)
        assert not Path(f"/proc/{info['pid']}").exists()
        assert read_pid_file(tmp_path) is None and not Path(info["work_dir"]).exists()
        assert _cli("triton", "status", "--repo", str(tmp_path)).returncode == 1
    finally:
        if info is not None and Path(f"/proc/{info['pid']}").exists():
            os.killpg(info["pid"], 9)
