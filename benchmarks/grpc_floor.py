"""What one plain ``Search`` costs the server, next to what gRPC itself costs per call.

Three servers, each in its own process, under the same load: 32 closed-loop clients, one
channel each (as ``benchmarks/test_search.py``'s ``grpc c=32`` row):

* ``empty unary, grpc.aio``: a method that does nothing but answer 64 request bytes with
  1,335 response bytes (a plain search's sizes: an ``item_id`` request, ten hits), raw
  bytes without protobuf, on ``grpc.aio.server``, the server medseek runs: the per-call
  floor of the stack;
* ``empty unary, grpc sync``: the same on the thread-pool server (``grpc.server``, 8
  threads), for comparison;
* ``medseek Search``: plain ``item_id`` searches (k = 10, explanations on) on
  ``test_search.py``'s 20k store and flat index, after a warm-up over every query id,
  and raw FAISS at the mean micro-batch the server formed, timed in this process, for the
  ANN's share (``test_search.py`` splits the server's CPU by thread).

Rounds are interleaved (echo aio, echo sync, medseek, raw FAISS), so load hits all alike;
the table is the median of ``--rounds``. CPU is the server process's utime + stime.

    python benchmarks/grpc_floor.py --rounds 3 --out runs/grpc_floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_search as ts  # noqa: E402  (the store, server process and load of the service)

CLIENTS, SERVICE = 32, "medseek.bench.Echo"
REQUEST, RESPONSE = b"q" * 64, b"r" * 1335


def _echo_handler(aio: bool):
    import grpc

    async def echo_aio(request, context):
        return RESPONSE

    def echo_sync(request, context):
        return RESPONSE

    method = grpc.unary_unary_rpc_method_handler(echo_aio if aio else echo_sync)
    return grpc.method_handlers_generic_handler(SERVICE, {"Echo": method})


def serve_echo(kind: str, port_file: Path) -> None:
    """``python grpc_floor.py echo {aio|sync} PORT_FILE``: the empty method on 127.0.0.1."""
    import grpc

    if kind == "aio":
        async def main():
            server = grpc.aio.server()
            server.add_generic_rpc_handlers([_echo_handler(True)])
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            port_file.write_text(str(port))
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.server(ThreadPoolExecutor(8))
        server.add_generic_rpc_handlers([_echo_handler(False)])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        port_file.write_text(str(port))
        server.wait_for_termination()


class EchoProcess(ts.ServerProcess):
    """An echo server process with ``ServerProcess``'s CPU accounting."""

    def __init__(self, kind: str, port_file: Path) -> None:
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, "echo", kind, str(port_file)])
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the {kind} echo server did not start")
            time.sleep(0.05)
        self.port = int(port_file.read_text())


async def echo_round(calls, per_client: int) -> float:
    """Wall seconds of ``per_client`` sequential empty calls on each of ``calls``."""
    async def client(call):
        for _ in range(per_client):
            assert await call(REQUEST) == RESPONSE

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in calls))
    return time.perf_counter() - t0


def run(rounds: int, per_client: int) -> dict:
    import faiss
    import grpc

    from medseek.index.faiss_index import FaissIndex
    from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc

    n = ts.SIZES["20k"]
    root = ts.build_store(n)
    ids = ts.query_ids(n, 512)
    queries = ts.query_vectors(n, ids)
    cfg = ts.server_config(root)
    faiss.omp_set_num_threads(cfg.faiss_threads or max(1, (os.cpu_count() or 2) - 1))
    if cfg.faiss_blas_min_batch is not None:
        faiss.cvar.distance_compute_blas_threshold = cfg.faiss_blas_min_batch * ts.DIM
    index = FaissIndex.load(ts.index_dir(root, "flat") / "image.npz")
    echo = {kind: EchoProcess(kind, root / f"echo-{kind}.port") for kind in ("aio", "sync")}
    service = ts.ServerProcess(root, "flat", {})
    rows: dict[str, list[dict]] = {}
    try:
        async def main():
            chans = {k: [grpc.aio.insecure_channel(f"127.0.0.1:{p.port}") for _ in range(CLIENTS)]
                     for k, p in (*echo.items(), ("service", service))}
            calls = {k: [c.unary_unary(f"/{SERVICE}/Echo") for c in chans[k]] for k in echo}
            stubs = [pb_grpc.RetrievalStub(c) for c in chans["service"]]
            for k in echo:
                await echo_round(calls[k], 10)
            # every query id once: the row and record caches are warm, as in production
            await ts.grpc_round(stubs, ids, CLIENTS, math.ceil(len(ids) / CLIENTS), False,
                                False, 0)
            for rnd in range(rounds):
                load = os.getloadavg()[0]
                for k, proc in echo.items():
                    c0 = proc.cpu_s()
                    wall = await echo_round(calls[k], per_client)
                    count = CLIENTS * per_client
                    rows.setdefault(f"empty unary, grpc {k}", []).append(
                        {"qps": count / wall, "cpu_ms": 1e3 * (proc.cpu_s() - c0) / count,
                         "load": load})
                c0, b0 = service.cpu_s(), service.batches()
                lat, wall = await ts.grpc_round(stubs, ids, CLIENTS, per_client, False, False,
                                                rnd * 997)
                c1, b1 = service.cpu_s(), service.batches()
                count, batch = len(lat), (b1[0] - b0[0]) / max(1.0, b1[1] - b0[1])
                rows.setdefault("medseek Search (20k flat)", []).append(
                    {"qps": count / wall, "cpu_ms": 1e3 * (c1 - c0) / count, "batch": batch,
                     "load": load})
                b = max(1, round(batch))
                _, raw_wall, raw_cpu = ts.raw_round(index, queries, b, max(1, count // b),
                                                    ts.K + 1, rnd * 997)
                done = b * max(1, count // b)
                rows.setdefault("raw FAISS in batches of the server's mean (this process)",
                                []).append({"qps": done / raw_wall, "cpu_ms": 1e3 * raw_cpu / done,
                                            "batch": b, "load": load})
            for cs in chans.values():
                for c in cs:
                    await c.close()

        asyncio.run(main())
    finally:
        for proc in (*echo.values(), service):
            proc.stop()
    return {name: summarise(rs) for name, rs in rows.items()}


def summarise(rs: list[dict]) -> dict:
    out = {"qps": statistics.median(r["qps"] for r in rs),
           "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
           "cpu_ms_rounds": [r["cpu_ms"] for r in rs], "load": [r["load"] for r in rs]}
    if "batch" in rs[0]:
        out["batch"] = statistics.mean(r["batch"] for r in rs)
    return out


def format_table(res: dict) -> str:
    lines = ["| server, 32 clients | qps | server CPU ms/call (median) | rounds |",
             "|---|---:|---:|---|"]
    for name, r in res.items():
        rounds = " / ".join(f"{v:.2f}" for v in r["cpu_ms_rounds"])
        batch = f" (batch {r['batch']:.1f})" if "batch" in r else ""
        lines.append(f"| {name}{batch} | {r['qps']:.0f} | {r['cpu_ms']:.3f} | {rounds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-client", type=int, default=40, help="calls per client per round")
    ap.add_argument("--out", type=Path, help="write the table's numbers as JSON here")
    args = ap.parse_args(argv)
    res = run(args.rounds, args.per_client)
    print(format_table(res))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["echo"]:
        serve_echo(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(main())
