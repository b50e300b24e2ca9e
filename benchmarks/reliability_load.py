"""Overload: light requests (text search) beside heavy ones (volume and large-image search)
from 64 clients; the light requests' p99 under that load against their p99 alone.

Clients are threads, each with its own channel: the light ones in this process, the heavy
ones in a second process (``_load_phase`` says why)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from medseek.serve.client import RetrievalClient
from medseek.serve.v1 import retrieval_pb2 as pb

import reliability_seeds as seeds
from reliability_server import ServerProcess

QUERIES = ("pleural effusion", "enlarged heart", "pneumothorax on the right",
           "clear lungs no acute disease", "bibasilar atelectasis", "pulmonary edema")


def _populate(address: str, reports: int, images: int, volumes: int) -> None:
    with RetrievalClient(address) as c:
        for i in range(0, reports, 50):
            c.ingest([pb.IngestItem(id=f"rep-{j}", text=f"{seeds.REPORTS[j % 5]} Case {j}.")
                      for j in range(i, min(reports, i + 50))], timeout=600)
        c.ingest([pb.IngestItem(id=f"img-{j}", image=seeds.png_bytes(64, j % 7))
                  for j in range(images)], timeout=600)
        c.ingest([pb.IngestItem(id=f"vol-{j}", volume=seeds.nifti_bytes(seed=j))
                  for j in range(volumes)], timeout=600)


def _light(rng_i: int) -> pb.SearchRequest:
    return pb.SearchRequest(text=QUERIES[rng_i % len(QUERIES)], k=10)


def _timed_lights(address: str, n: int) -> list[float]:
    out = []
    with RetrievalClient(address) as c:
        for i in range(n):
            t0 = time.perf_counter()
            c.search(_light(i), timeout=120)
            out.append(time.perf_counter() - t0)
    return out


def _clients(address: str, kind: str, requests: list, n: int, pace: float, ramp_s: float,
             duration_s: float) -> tuple[list[float], Counter, dict[str, str]]:
    """``n`` client threads, each on its own channel, looping over ``requests`` (one per
    ``pace`` seconds on a fixed schedule from a spread-out phase, at once when behind; 0:
    back to back) for ``ramp_s + duration_s``; the latencies of the OK answers to requests
    sent after the ramp-up, every status code seen, and one error's details per code."""
    stop, measuring = threading.Event(), threading.Event()
    lock = threading.Lock()
    lat: list[float] = []
    codes: Counter = Counter()
    details: dict[str, str] = {}  # an example of each error: which budget or queue

    def client(i: int) -> None:
        due = time.perf_counter() + pace * ((i * 0.618) % 1.0)
        with RetrievalClient(address, max_message_bytes=64 * 1024 * 1024) as c:
            j = 0
            while not stop.is_set():
                if pace:
                    # stop ends the wait of every paced client at once: sending then would
                    # be a burst of n requests that no schedule asked for
                    if stop.wait(max(0.0, due - time.perf_counter())):
                        break
                    due = max(due + pace, time.perf_counter())
                req = requests[(i + j) % len(requests)]
                counted = measuring.is_set()  # sent inside the measured window
                t0 = time.perf_counter()
                try:
                    c.search(req, timeout=300)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    details.setdefault(f"{kind} {code}", exc.details())
                dt = time.perf_counter() - t0
                with lock:
                    codes[f"{kind} {code}"] += 1
                    if code == "OK" and counted:
                        lat.append(dt)
                j += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(ramp_s)  # ramp-up: every client in flight
    measuring.set()
    time.sleep(duration_s)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    return lat, codes, details


def _heavy_process(address: str, serialized: list[bytes], n: int, ramp_s: float,
                   duration_s: float, nice: int, out) -> None:
    """The heavy clients, in a process of their own (``_load_phase``), at ``nice``."""
    if nice:
        os.nice(nice)
    requests = [pb.SearchRequest.FromString(b) for b in serialized]
    out.put(_clients(address, "heavy", requests, n, 0.0, ramp_s, duration_s))


def _load_phase(address: str, heavy: list, n_heavy: int, n_light: int,
                duration_s: float, light_interval_s: float = 0.0, heavy_nice: int = 0) -> dict:
    """``n_heavy`` clients looping over ``heavy`` requests and ``n_light`` over text
    searches for ``duration_s`` (after a ramp-up); latencies of the OK answers, and every
    status code seen. With ``light_interval_s`` a light client sends one request per
    interval, like a person at a viewer; 0: back to back (closed loop).

    The heavy clients run in a process of their own, as they would on other machines:
    in one process, their threads building and copying 21 MB messages held this
    process's GIL while the light clients' answers waited to be read, and the light
    latencies measured the load generator as much as the server. ``heavy_nice`` lowers
    that process's priority: on a machine of 2 cores, clients that stand in for other
    machines otherwise take the server's cores (the light clients keep nice 0: their
    latencies are what is measured)."""
    ramp = min(10.0, duration_s / 4)
    heavy_proc = None
    if n_heavy:
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        heavy_proc = ctx.Process(target=_heavy_process, daemon=True, args=(
            address, [r.SerializeToString() for r in heavy], n_heavy, ramp, duration_s,
            heavy_nice, results))
        heavy_proc.start()
    lights = [_light(i) for i in range(len(QUERIES))]
    light_lat, codes, errors = _clients(address, "light", lights, n_light, light_interval_s, ramp,
                                duration_s)
    lat = {"light": light_lat, "heavy": []}
    if heavy_proc is not None:
        lat["heavy"], heavy_codes, heavy_errors = results.get(timeout=900)
        codes.update(heavy_codes)
        errors.update(heavy_errors)
        heavy_proc.join(timeout=60)
    out = {"codes": dict(codes), "errors": errors}
    for kind, values in lat.items():
        if values:
            out[kind] = {"n": len(values), "p50_ms": float(np.percentile(values, 50)) * 1e3,
                         "p99_ms": float(np.percentile(values, 99)) * 1e3}
    return out


def onnx_repository(out: Path) -> Path:
    """The towers of ``medseek serve``'s default local encoder (``LocalTorchEncoder``: the
    untrained seeded image and volume towers) exported to an ONNX model repository, so the
    same models can be served by ONNX Runtime (``--encoder onnx``), as production serves
    them: one GIL-free call per batch instead of an eager torch op per layer."""
    from medseek.export.repository import write_repository
    from medseek.serve.local_encoder import LocalTorchEncoder

    enc = LocalTorchEncoder(seed=0)
    write_repository([enc._image, enc._volume], out)
    return out


def overload(workdir: Path, clients: int = 64, heavy_fraction: float = 0.5,
             duration_s: float = 60.0, unloaded_n: int = 200, light_interval_s: float = 0.0,
             encoder: str = "local", heavy_nice: int = 0, serve_extra: dict | None = None,
             log=print) -> dict:
    """Light p99 alone, under ``clients`` clients (``heavy_fraction`` of them heavy), and
    under the same number of light clients without the heavy ones (a control that tells
    waiting behind heavy work from plain concurrency on this machine's cores). Light
    clients send back to back, or one request per ``light_interval_s``. ``encoder``: the
    server's, ``local`` (torch in process) or ``onnx`` (the same towers in ONNX Runtime);
    ``heavy_nice``: the heavy clients' process priority (``_load_phase``); ``serve_extra``:
    further ServeConfig keys of the server."""
    # a 256 x 256 x 160 int16 CT at 1 mm (21 MB) and a 2048 x 2048 radiograph (4 MP)
    heavy = [pb.SearchRequest(volume=seeds.nifti_bytes((256, 256, 160), (1.0, 1.0, 1.0),
                                                       seed=9, dtype=np.int16), k=10),
             pb.SearchRequest(image=seeds.png_bytes(2048, 5), k=10, diversify=True)]
    n_heavy = int(round(clients * heavy_fraction))
    args = ()
    if encoder == "onnx":
        args = ("--encoder", "onnx", "--model-repo",
                str(onnx_repository(Path(workdir) / "model_repository")))
    with ServerProcess(Path(workdir), tokens=False, max_message_bytes=64 * 1024 * 1024,
                       extra=serve_extra, args=args) as s:
        _populate(s.address, reports=400, images=100, volumes=8)
        _timed_lights(s.address, 20)  # warm-up
        alone = np.array(_timed_lights(s.address, unloaded_n)) * 1e3
        log(f"  unloaded light p50 {np.percentile(alone, 50):.1f} ms, "
            f"p99 {np.percentile(alone, 99):.1f} ms")
        mixed = _load_phase(s.address, heavy, n_heavy, clients - n_heavy, duration_s,
                            light_interval_s, heavy_nice)
        log(f"  mixed: {mixed}")
        control = _load_phase(s.address, heavy, 0, clients - n_heavy, duration_s,
                              light_interval_s)
        log(f"  light only: {control}")
        alive = s.alive()
    p99 = float(np.percentile(alone, 99))
    ratio = lambda phase: phase["light"]["p99_ms"] / p99 if "light" in phase else None  # noqa: E731
    return {"clients": clients, "heavy_clients": n_heavy, "duration_s": duration_s,
            "light_interval_s": light_interval_s, "encoder": encoder, "heavy_nice": heavy_nice,
            "serve_extra": serve_extra or {},
            "unloaded": {"n": len(alone), "p50_ms": float(np.percentile(alone, 50)),
                         "p99_ms": p99},
            "mixed": mixed, "light_only": control, "p99_ratio": ratio(mixed),
            "p99_ratio_light_only": ratio(control), "server_alive": alive}
