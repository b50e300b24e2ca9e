"""``medseek serve --workers N``: N server processes on one host behind one port.

Why processes: the service's own work per query (protobuf, asyncio, the search steps in
numpy and SQLite) holds the GIL, so one process tops out at about one core however many
threads it has. N processes bind the same port with ``SO_REUSEPORT`` and the kernel
spreads incoming connections over them (a gRPC channel is one connection, so a client
with one channel stays with one worker; many clients spread).

What they share, and how:

* **the store**: one SQLite file in WAL mode. Readers never block each other or the
  writer; writes from several workers are serialised by SQLite's write lock (with the
  store's busy timeout), and an ingest is acknowledged only after its commit, as with one
  process.
* **the index**: each worker holds its own copy, loaded from ``index_dir`` at start-up
  and caught up from the store's changelog before every search batch (one ``last_seq``
  read when nothing changed; ``SearchSteps.catch_up``). A write acknowledged by one
  worker is therefore seen by the next search of every worker. The alternative, one
  memory-mapped index file shared read-only, saves memory (N copies of a flat 1M x 256
  index is N GB) but FAISS can map only some kinds (IVF lists, not HNSW graphs or the
  flat ``IndexIDMap2``) and the mapped file could not take writes, so ingest would need
  a separate rebuild-and-swap protocol. Catching up from the changelog reuses what
  start-up already does, works for every index kind, and keeps the store the only source
  of truth.

Only worker 0 serves the Prometheus metrics port (the others have none). Each worker
saves its index at shutdown; the files are written atomically and carry the seq they
applied, so whichever lands last is a valid start for the next start-up.

Past one machine the same split holds: stateless front ends (``medseek serve`` without a
local store write path) behind a gRPC-aware load balancer, a Milvus cluster as the
shared index (``index = {kind = "milvus", uri = ...}``) so no front end holds a copy,
the store moved to a shared database, and Triton replicas per GPU behind the encoder.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import socket
import time
from dataclasses import replace
from typing import Callable

from .config import ServeConfig

log = logging.getLogger(__name__)

#: A worker that dies is restarted, unless this many died within ``_RESTART_WINDOW_S``.
_MAX_RESTARTS, _RESTART_WINDOW_S = 5, 60.0


def free_port(host: str) -> int:
    """A port free on ``host`` now, for workers that must all bind the same one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _worker_main(config: ServeConfig, encoder_factory: Callable, index: int, ready) -> None:
    """One worker process: build its encoder, serve until SIGTERM/SIGINT."""
    from .server import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us with SIGTERM
    serve(config, encoder_factory(), lambda server, port: ready.put((index, port)))


class WorkerPool:
    """Start, watch and stop ``config.workers`` server processes on one port.

    Parameters
    ----------
    config : ServeConfig
        With ``workers >= 2``. Port 0 picks one free port that every worker binds.
    encoder_factory : callable
        Builds a worker's encoder in that worker (picklable: a module-level function or a
        ``functools.partial`` of one).
    """

    def __init__(self, config: ServeConfig, encoder_factory: Callable) -> None:
        if config.workers < 2:
            raise ValueError(f"a WorkerPool needs workers >= 2, got {config.workers}")
        port = config.port or free_port(config.host)
        self.config = replace(config, port=port)
        self.encoder_factory = encoder_factory
        self._ctx = mp.get_context("spawn")  # no forked copies of threads or open SQLite
        self._ready = self._ctx.Queue()
        self._procs: dict[int, mp.Process] = {}
        self._deaths: list[float] = []

    @property
    def port(self) -> int:
        return self.config.port

    def _worker_config(self, index: int) -> ServeConfig:
        # only worker 0 serves metrics: one HTTP port cannot be shared
        return self.config if index == 0 else replace(self.config, metrics_port=None)

    def _spawn(self, index: int, timeout: float) -> None:
        proc = self._ctx.Process(target=_worker_main, name=f"medseek-worker-{index}",
                                 args=(self._worker_config(index), self.encoder_factory, index,
                                       self._ready), daemon=False)
        proc.start()
        self._procs[index] = proc
        deadline = time.monotonic() + timeout
        while True:  # wait for this worker's "bound and serving"
            try:
                got, _ = self._ready.get(timeout=0.2)
            except Exception:  # noqa: BLE001 - queue.Empty: look at the process
                got = None
            if got == index:
                return
            if not proc.is_alive():
                raise RuntimeError(f"worker {index} exited with status {proc.exitcode} "
                                   "before it was serving (see its log above)")
            if time.monotonic() > deadline:
                proc.terminate()
                raise RuntimeError(f"worker {index} was not serving after {timeout:.0f} s")

    def start(self, timeout: float = 300.0) -> None:
        """Worker 0 first (it may migrate or create the store and build the indexes and
        saves nothing the others need), then the rest, each once it is serving."""
        try:
            for i in range(self.config.workers):
                self._spawn(i, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("%d workers serving on %s:%d", self.config.workers, self.config.host,
                 self.port)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def watch(self, stop: Callable[[], bool], poll_s: float = 0.5,
              timeout: float = 300.0) -> None:
        """Until ``stop()`` is true: restart a worker that died, unless they keep dying
        (then stop them all and raise)."""
        while not stop():
            for i, proc in list(self._procs.items()):
                if proc.is_alive():
                    continue
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW_S] + [now]
                if len(self._deaths) > _MAX_RESTARTS:
                    self.stop()
                    raise RuntimeError(f"{len(self._deaths)} workers died within "
                                       f"{_RESTART_WINDOW_S:.0f} s; giving up")
                log.warning("worker %d exited with status %s; restarting it", i, proc.exitcode)
                self._spawn(i, timeout)
            time.sleep(poll_s)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every worker (each stops gracefully and saves its index), then wait."""
        grace = self.config.grace_s if grace is None else grace
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs.values():
            proc.join(grace + 30.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._procs.clear()

    def __enter__(self) -> WorkerPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
