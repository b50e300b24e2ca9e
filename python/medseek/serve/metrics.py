"""Prometheus metrics of the server, on a private registry (no process globals).

- ``medseek_stage_seconds{stage}``: per-stage latency of searches (filter, ann, fetch,
  rerank, diversify, explain, total) and of ``encode``/``decode``/``store_commit``.
- ``medseek_rpc_seconds{method, code}``: handler latency per RPC and status.
- ``medseek_batch_size{batcher}``: requests per micro-batch.
- ``medseek_queue_depth{queue}``: requests waiting in each bounded queue.
- ``medseek_index_size{collection}``: vectors in each collection's ANN index.
- ``medseek_stream_in_flight``: SearchStream requests read and not yet answered (each
  stream holds at most ``ServeConfig.stream_window``).

Served over HTTP on 127.0.0.1 only (``ServeConfig.metrics_port``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


class ServerMetrics:
    """The metric families of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.stage = Histogram("medseek_stage_seconds", "Latency of one pipeline stage",
                               ["stage"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.rpc = Histogram("medseek_rpc_seconds", "Handler latency per RPC",
                             ["method", "code"], buckets=_LATENCY_BUCKETS,
                             registry=self.registry)
        self.batch = Histogram("medseek_batch_size", "Requests per micro-batch", ["batcher"],
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.queue = Gauge("medseek_queue_depth", "Requests waiting", ["queue"],
                           registry=self.registry)
        self.index_size = Gauge("medseek_index_size", "Vectors in the ANN index",
                                ["collection"], registry=self.registry)
        self.stream_in_flight = Gauge("medseek_stream_in_flight", "SearchStream requests "
                                      "read and not yet answered", registry=self.registry)
        self._http = None

    def on_batch(self, name: str, size: int, seconds: float) -> None:
        self.batch.labels(name).observe(size)
        self.stage.labels(f"{name}_batch").observe(seconds)

    def text(self) -> bytes:
        """The exposition text (what a scrape returns)."""
        return generate_latest(self.registry)

    def serve_http(self, port: int) -> int:
        """Serve on 127.0.0.1:port (0 picks one); returns the bound port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
