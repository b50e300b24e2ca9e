"""The gRPC retrieval service ``medseek.v1.Retrieval`` (DESIGN.md).

- ``config.py``: ``ServeConfig`` and friends (dataclasses; the CLI loads them from JSON/TOML).
- ``server.py``: ``create_server(config, encoder) -> (server, port)``, ``serve``, ``ServerThread``.
- ``servicer.py``: the thin gRPC adapter (statuses, latency, SearchStream flow control) over
  ``query_service.py`` (Search, Diagnose, Get, Stats: a ``SearchRequest`` becomes a typed
  ``medseek.search.SearchQuery``) and ``ingest_service.py`` (Ingest, Delete), which share
  ``encoding.py`` (decode pool, encoder thread); ``errors.py`` maps failures to statuses;
  ``batcher.py``: the async micro-batcher and bounded queue. z-ranges are half-open
  ``[z_start, z_end)`` throughout (``medseek.search.query``).
- ``ingest.py``: request items -> de-identified pixels, records, content hashes, embeddings.
- ``report_ranker.py``: the report collection's embedding: ``hybrid`` (in-process MiniLM +
  laterality-aware finding concepts, the default) or ``joint`` (the encoder's text tower).
- ``auth.py``: bearer-token interceptor; ``metrics.py``: Prometheus metrics.
- ``local_encoder.py``: ``LocalTorchEncoder``, an in-process torch encoder for tests and
  CPU-only use (production uses the Triton / ONNX Runtime encoders of ``medseek.encoders``).
- ``commands.py``: the ``medseek serve`` / ``ingest`` / ``query`` / ``stats`` parsers and
  ``medseek serve`` (``workers.py``: ``--workers N``); ``client_commands.py``: ingest,
  query and stats against a running server; ``ingest_sources.py``: the items of a folder,
  zip, DICOMDIR or manifest.
- ``gateway*.py``, ``static/``: the HTTP/JSON gateway and the browser viewer;
  ``pacs_commands.py``, ``reident.py``: DICOMweb sync and clinical re-identification;
  ``draft_*.py``, ``contrastive_service.py``, ``auto_regions.py``: reasoning over
  retrieved cases.
- ``v1/``: generated protobuf/gRPC code (``python -m medseek.serve.codegen``).
"""
