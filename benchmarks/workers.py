"""Throughput of ``medseek serve`` with 1 and with 2 worker processes (``--workers``).

The search benchmark's store (``test_search.build_store``: 20k images of dim 256, exact
flat index, built once and cached) is served by one process (``serve``) and then by a
``WorkerPool`` of two on one port, with the same hash encoder, and queried the same way:
``clients`` closed-loop clients, each on its own channel (its own connection, so the
kernel spreads them over the workers), plain ``item_id`` searches, k = 10. Reported per
row (median of ``rounds`` interleaved rounds): qps, p50 / p99 latency, and the servers'
CPU seconds per query (all worker processes together).

    python benchmarks/workers.py --rounds 3 --out runs/workers.json
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_search as ts  # noqa: E402


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def load(port: int, pids: list[int], ids: list[int], clients: int, per_client: int,
               offset: int) -> dict:
    import grpc

    from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(clients)]
    stubs = [pb_grpc.RetrievalStub(c) for c in channels]
    try:
        await ts.grpc_round(stubs, ids, clients, 1, False, False, 0)  # connect, warm up
        c0 = cpu_s(pids)
        lat, wall = await ts.grpc_round(stubs, ids, clients, per_client, False, False, offset)
        cpu = cpu_s(pids) - c0
    finally:
        for c in channels:
            await c.close()
    lat.sort()
    return {"qps": len(lat) / wall, "p50_ms": 1e3 * lat[len(lat) // 2],
            "p99_ms": 1e3 * lat[int(0.99 * (len(lat) - 1))], "cpu_ms": 1e3 * cpu / len(lat)}


def main() -> None:
    from medseek.serve.workers import WorkerPool

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    # as ServerProcess does for its one process: numpy's BLAS threads would spin
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    root = ts.build_store(20_000)
    ids = ts.query_ids(20_000, 400)
    rows: dict[str, list[dict]] = {"1 worker": [], "2 workers": []}
    for r in range(args.rounds):
        for name in rows:  # interleaved, so machine load hits both alike
            if name == "1 worker":
                server = ts.ServerProcess(root, {})
                port, pids, stop = server.port, [server.proc.pid], server.stop
            else:
                cfg = ts.server_config(root, workers=2)
                pool = WorkerPool(cfg, functools.partial(ts.HashEncoder))
                pool.start()
                port, pids, stop = pool.port, pool.pids(), pool.stop
            try:
                got = asyncio.run(load(port, pids, ids, args.clients, args.per_client, r))
            finally:
                stop()
            got["load"] = os.getloadavg()[0]
            rows[name].append(got)
            print(name, json.dumps(got), flush=True)
    summary = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
               for name, rs in rows.items()}
    summary["speedup"] = summary["2 workers"]["qps"] / summary["1 worker"]["qps"]
    summary["machine"] = f"{platform.node()} {os.cpu_count()} cores"
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
