"""How long gRPC's Python (asyncio) server stalls its event loop receiving large messages:
one 21 MB message per call (as a unary ``Search`` with a CT) against the same bytes in
1 MiB and 256 KiB chunks of a client stream (as ``SearchUpload``).

A bare ``grpc.aio`` server with handlers that only take the bytes; a monitor task sleeps
1 ms in a loop and records how late it wakes (the loop's lag). Two client processes send
``--calls`` uploads each, back to back. Every message gRPC hands the server is copied
while the GIL is held, so the lag is what every other request of the process waits::

    python benchmarks/grpc_large_messages.py --calls 30 --mib 21
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time

import grpc
import numpy as np

MIB = 1 << 20


def _client(port: int, calls: int, size: int, chunk: int) -> None:
    opts = [("grpc.max_send_message_length", 64 * MIB)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
        payload = os.urandom(size)
        if chunk:
            call = ch.stream_unary("/bench.B/Stream")
            view = memoryview(payload)
            for _ in range(calls):
                call(iter([view[i:i + chunk].tobytes() for i in range(0, size, chunk)]))
        else:
            call = ch.unary_unary("/bench.B/Unary")
            for _ in range(calls):
                call(payload)


async def _measure(calls: int, size: int, chunk: int, clients: int) -> dict:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MIB)])

    async def unary(request, context):
        return b""

    async def stream(chunks, context):
        parts = [c async for c in chunks]
        return b"" if sum(map(len, parts)) == size else b"short"

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.B", {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.stream_unary_rpc_method_handler(stream)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    lags, done = [], asyncio.Event()

    async def monitor():
        while not done.is_set():
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)

    task = asyncio.ensure_future(monitor())
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_client, args=(port, calls, size, chunk)) for _ in range(clients)]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    while any(p.is_alive() for p in procs):
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - t0
    done.set()
    await task
    await server.stop(None)
    lag = np.array(lags) * 1e3
    n = calls * clients
    return {"chunk_bytes": chunk, "uploads": n, "wall_s": round(wall, 2),
            "lag_p50_ms": round(float(np.percentile(lag, 50)), 2),
            "lag_p99_ms": round(float(np.percentile(lag, 99)), 1),
            "lag_max_ms": round(float(lag.max()), 1),
            "stalled_ms_per_upload": round(float(lag[lag > 1].sum()) / n, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=30, help="uploads per client process")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--mib", type=float, default=21.0, help="upload size (MiB)")
    args = p.parse_args(argv)
    size = int(args.mib * MIB)
    print("| message | uploads | wall s | loop lag p50 ms | p99 ms | max ms | "
          "stalled ms per upload |\n|---|---:|---:|---:|---:|---:|---:|")
    for chunk in (0, MIB, 256 * 1024):
        r = asyncio.run(_measure(args.calls, size, chunk, args.clients))
        what = f"{args.mib:g} MiB, one message" if not chunk else f"{chunk // 1024} KiB chunks"
        print(f"| {what} | {r['uploads']} | {r['wall_s']} | {r['lag_p50_ms']} | "
              f"{r['lag_p99_ms']} | {r['lag_max_ms']} | {r['stalled_ms_per_upload']} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
