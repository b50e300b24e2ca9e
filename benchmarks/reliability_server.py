"""A ``medseek serve`` subprocess for the reliability suite: started from a JSON config,
killed or stopped on demand, its log kept. A crash is the process dying; a hang is a
request past its deadline while the process is alive."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

MIB = 1024 * 1024
#: development-only de-identification key of the suite's servers (pseudonyms protect nothing)
DEID_KEY = b"reliability-suite-development-key-0001"
TOKEN = "reliability-token-0123456789"


class ServerProcess:
    """``python -m medseek.serve serve --config ...`` on 127.0.0.1, port 0.

    Parameters
    ----------
    workdir : Path
        Holds the config, store, index, port file and ``server.log`` (stdout + stderr of
        every start, appended).
    tokens : bool
        Require the bearer ``TOKEN``.
    max_message_bytes : int
        The server's receive limit (oversize cases are cheap to build against a small one).
    extra : dict
        Further ServeConfig keys.
    args : tuple of str
        Further ``medseek serve`` arguments (e.g. ``--encoder onnx --model-repo DIR``).
    """

    def __init__(self, workdir: Path, tokens: bool = True, max_message_bytes: int = 8 * MIB,
                 extra: dict | None = None, args: tuple[str, ...] = ()) -> None:
        self.workdir = Path(workdir)
        self.args = tuple(args)
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "deid.key").write_bytes(DEID_KEY)
        cfg = {"store_path": "store.db", "index_dir": "index", "deid_key_file": "deid.key",
               "max_receive_message_bytes": max_message_bytes, "grace_s": 5.0, **(extra or {})}
        if tokens:
            (self.workdir / "tokens").write_text(TOKEN + "\n")
            cfg["tokens_file"] = "tokens"
        (self.workdir / "serve.json").write_text(json.dumps(cfg, indent=1))
        self.token = TOKEN if tokens else None
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metadata(self) -> tuple:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def start(self, timeout: float = 300.0) -> None:
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medseek.serve", "serve",
                 "--config", str(self.workdir / "serve.json"), "--port", "0",
                 "--port-file", str(port_file), *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        finally:
            log.close()
        self.starts += 1
        t0 = time.monotonic()
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} while starting; "
                                   f"see {self.log_path}")
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise TimeoutError(f"server did not start within {timeout} s")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        with grpc.insecure_channel(self.address) as ch:
            grpc.channel_ready_future(ch).result(timeout=timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)

    def stop(self, timeout: float = 120.0) -> int | None:
        """SIGTERM (graceful: indexes saved), SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def rss_mib(self) -> float:
        """Resident memory of the server process (MiB), 0 when it is not running."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AttributeError):
            pass
        return 0.0

    def files(self) -> list[Path]:
        """Every file the server writes: store (with WAL and SHM), indexes."""
        found = sorted(self.workdir.glob("store.db*"))
        index = self.workdir / "index"
        if index.exists():
            found += sorted(p for p in index.rglob("*") if p.is_file())
        return found

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
