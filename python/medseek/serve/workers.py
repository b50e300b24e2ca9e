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

``--upload-workers N`` (``start_upload_workers``) uses the same processes for another
end: N workers on a second port, at lower priority (``upload_nice``), that take the image
and volume searches. Stats advertises their port and ``RetrievalClient`` sends those
searches there, so receiving a 21 MB upload, decoding and encoding it hold neither the
event loop nor the GIL of the process that answers text and item queries, and the
scheduler gives that process the cores first. Separate lanes inside one process could
not do that on a small host: gRPC copies every received chunk on the event loop, and
decoding shares the GIL (RESULTS.md, "Reliability", fifth pass). They share the store and
catch up like any worker (``ServeConfig.shares_store``).

Past one machine the same split holds: stateless front ends (``medseek serve`` without a
local store write path) behind a gRPC-aware load balancer, a Milvus cluster as the
shared index (``index = {kind = "milvus", uri = ...}``) so no front end holds a copy,
the store moved to a shared database, and Triton replicas per GPU behind the encoder; the
upload split becomes routing by method at the load balancer (``SearchUpload`` and content
searches to a pool of their own).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
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


def _worker_main(config: ServeConfig, encoder_factory: Callable, index: int, ready,
                 nice: int = 0) -> None:
    """One worker process: lower its priority by ``nice``, build its encoder, serve until
    SIGTERM/SIGINT."""
    from .server import serve

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us with SIGTERM
    if nice:
        os.nice(nice)  # before any thread starts: they all inherit it
    serve(config, encoder_factory(), lambda server, port: ready.put((index, port)))


class WorkerPool:
    """Start, watch and stop ``config.workers`` server processes on one port.

    Parameters
    ----------
    config : ServeConfig
        With ``workers >= 2``, unless ``processes`` is given. Port 0 picks one free port
        that every worker binds.
    encoder_factory : callable
        Builds a worker's encoder in that worker (picklable: a module-level function or a
        ``functools.partial`` of one).
    processes : int, optional
        How many (>= 1); default ``config.workers``. The upload workers
        (``ServeConfig.upload_workers``) may be one.
    nice : int
        Lower each worker's scheduling priority by this much.
    role : str
        Names the processes (``medseek-<role>-<i>``) and the log lines.
    """

    def __init__(self, config: ServeConfig, encoder_factory: Callable,
                 processes: int | None = None, nice: int = 0, role: str = "worker") -> None:
        if processes is None and config.workers < 2:
            raise ValueError(f"a WorkerPool needs workers >= 2, got {config.workers}")
        self.processes = config.workers if processes is None else processes
        if self.processes < 1:
            raise ValueError(f"a WorkerPool needs processes >= 1, got {self.processes}")
        port = config.port or free_port(config.host)
        self.config = replace(config, port=port)
        self.encoder_factory = encoder_factory
        self.nice, self.role = nice, role
        self._closed = False  # stop() was called: watch() restarts nothing
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
        proc = self._ctx.Process(target=_worker_main, name=f"medseek-{self.role}-{index}",
                                 args=(self._worker_config(index), self.encoder_factory, index,
                                       self._ready, self.nice), daemon=False)
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
            for i in range(self.processes):
                self._spawn(i, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("%d %s processes serving on %s:%d", self.processes, self.role,
                 self.config.host, self.port)

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    def watch(self, stop: Callable[[], bool], poll_s: float = 0.5,
              timeout: float = 300.0) -> None:
        """Until ``stop()`` is true: restart a worker that died, unless they keep dying
        (then stop them all and raise)."""
        while not (stop() or self._closed):
            for i, proc in list(self._procs.items()):
                if proc.is_alive() or self._closed:
                    continue
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < _RESTART_WINDOW_S] + [now]
                if len(self._deaths) > _MAX_RESTARTS:
                    self.stop()
                    raise RuntimeError(f"{len(self._deaths)} workers died within "
                                       f"{_RESTART_WINDOW_S:.0f} s; giving up")
                log.warning("%s %d exited with status %s; restarting it", self.role, i,
                            proc.exitcode)
                self._spawn(i, timeout)
            time.sleep(poll_s)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM every worker (each stops gracefully and saves its index), then wait."""
        self._closed = True
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


def start_upload_workers(cfg, encoder_factory):
    """``--upload-workers N``: N worker processes on ``cfg.upload_port`` (a free one for
    0) at ``cfg.upload_nice``, started, then watched from a thread (one that dies is
    restarted). Returns the config with the port filled in (Stats advertises it) and the
    pool (``stop()`` it)."""
    cfg = replace(cfg, upload_port=cfg.upload_port or free_port(cfg.host))
    # upload_port 0: a worker advertises none (it is where uploads go); upload_workers
    # kept: other processes write its store (ServeConfig.shares_store)
    own = replace(cfg, port=cfg.upload_port, workers=cfg.upload_workers, upload_port=0,
                  metrics_port=None)
    pool = WorkerPool(own, encoder_factory, processes=cfg.upload_workers,
                      nice=cfg.upload_nice, role="upload")
    pool.start()
    threading.Thread(target=_watch, args=(pool,), name="medseek-upload-watch",
                     daemon=True).start()
    return cfg, pool


def _watch(pool) -> None:
    """``pool.watch`` until ``pool.stop()``; if it gives up, the main server goes on
    (uploads sent to the advertised port then fail, and clients send them here)."""
    try:
        pool.watch(lambda: False)
    except RuntimeError as exc:
        log.error("upload workers: %s", exc)
