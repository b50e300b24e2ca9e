"""``medseek demo``'s service part: Triton + the gRPC retrieval server per demo model.

A *site* is one exported demo model served the production way: ``tritonserver`` (the
pytriton wheel's binary, python backend running ONNX Runtime on the CPU) on the model's
Triton repository, and the ``medseek.v1.Retrieval`` gRPC server on 127.0.0.1 (port 0) with
the Triton encoder client as its encoder, over its own SQLite store and FAISS indexes.
Everything below talks to the server through the gRPC client only: ingest, queries,
metrics. :class:`RunningSite` is a context manager: leaving it (normally, on an error or
on Ctrl-C) stops the server, closes the encoder and stops tritonserver's process group.
"""

from __future__ import annotations

import functools
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medseek.data.manifest import ManifestRecord, read_manifest

@functools.cache
def _pseudonym_key():
    from medseek.io import DeidConfig

    return DeidConfig.development()  # a public key: demos only


def pseudonym(kind: str, value: str) -> str:
    """A keyed pseudonym of an identifier (the server never sees the corpus ids)."""
    if not value:
        return ""
    prefix = {"patient": "pt", "study": "st", "document": "doc"}[kind]
    return f"{prefix}-{_pseudonym_key().digest(kind, value.encode()).hex()[:12]}"


@dataclass
class Split:
    """The corpus items the site archives, and the held-out items that query it."""

    archive: list[ManifestRecord]
    queries: list[ManifestRecord]
    query_split: str


MIN_QUERIES = 3


def split_corpus(corpus: Path, kind: str) -> Split:
    """Archive = train + val, queries = test; when the test split holds fewer than
    ``MIN_QUERIES`` items (tiny corpora), archive = train and queries = val + test."""
    rows = [r for r in read_manifest(corpus / "manifest.parquet") if r.kind == kind]
    test = [r for r in rows if r.split == "test"]
    val = [r for r in rows if r.split == "val"]
    train = [r for r in rows if r.split == "train"]
    if len(test) >= MIN_QUERIES:
        return Split(train + val, test, "test")
    if val or test:
        return Split(train, val + test, "val+test" if val and test else ("val" if val else "test"))
    raise SystemExit(f"medseek demo: corpus {corpus} has no held-out {kind} items (no test or "
                     "val split); raise the corpus size (--n-cxr, --n-wrist, --n-ct)")


def report_texts(corpus: Path) -> dict[str, str]:
    """source id -> report text of a corpus whose reports are rows of their own (synth-cxr:
    one report row per study, its images carry none); read at run time, never stored in
    the repository."""
    return {r.source_id: r.report for r in read_manifest(corpus / "manifest.parquet")
            if r.kind == "report" and r.report}


def ingest_item(corpus: Path, rec: ManifestRecord, with_regions: bool, collection: str = "",
                reports: dict[str, str] | None = None):
    from medseek.serve.v1 import retrieval_pb2 as pb

    content = (corpus / rec.path).read_bytes()
    report = rec.report or (reports or {}).get(rec.source_id, "")
    item = pb.IngestItem(
        id=rec.id, collection=collection, modality=rec.modality, body_part=rec.body_part.lower(), view=rec.view,
        labels=list(rec.labels), patient_pseudonym=pseudonym("patient", rec.patient_id),
        study_pseudonym=pseudonym("study", rec.study_id),
        source_document=pseudonym("document", rec.source_id), report=report,
        **{rec.kind: content})
    if with_regions:
        for reg in rec.regions:
            if reg.box is not None:
                x0, y0, x1, y1 = reg.box
                item.regions.add(name=reg.name, box=pb.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    return item


@dataclass
class RunningSite:
    """Triton + gRPC server of one demo model; use as a context manager."""

    name: str
    repo: Path
    workdir: Path
    kind: str  # "image" or "volume"
    startup_timeout: float = 300.0
    target_spacing: float = 2.0
    auto_regions: bool = False  # the server's localiser boxes images ingested without any
    timings: dict = field(default_factory=dict)

    def __enter__(self) -> RunningSite:
        self._stack = ExitStack()
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _start(self) -> None:
        from medseek.encoders import EncoderSpec, TritonEncoder, TritonEncoderConfig
        from medseek.io import DeidConfig
        from medseek.serve.client import RetrievalClient
        from medseek.serve.config import BatchConfig, PreprocessSpec, ServeConfig
        from medseek.serve.server import ServerThread
        from medseek.serve.triton import (TritonServer, TritonServerConfig, stop_from_pid_file,
                                          write_pid_file)

        if self.workdir.exists():  # a fresh archive each run: ingest is part of the demo
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        # a tritonserver left by a demo that was SIGKILLed is stopped before a new one starts
        stop_from_pid_file(self.repo, grace=5.0)
        t0 = time.perf_counter()
        triton = TritonServer(TritonServerConfig(self.repo, log_path=self.workdir / "triton.log",
                                                 startup_timeout=self.startup_timeout))
        self._stack.callback(self._stop_triton, triton)
        triton.start()
        write_pid_file(triton)
        self.triton = triton
        self.timings["triton_start_s"] = time.perf_counter() - t0
        graph = "image_encoder" if self.kind == "image" else "volume_encoder"
        spec = EncoderSpec.load(self.repo / graph / "1" / "spec.json")
        self.spec = spec
        encoder = TritonEncoder(TritonEncoderConfig(triton.grpc_url, batch_size=16,
                                                    client_timeout=300.0), spec)
        self._stack.callback(encoder.close)
        t0 = time.perf_counter()
        cfg = ServeConfig(
            store_path=self.workdir / "medseek.sqlite", index_dir=self.workdir / "indexes",
            host="127.0.0.1", port=0, model=spec.name, deid=DeidConfig.development(),
            grace_s=5.0, encode_batch=BatchConfig(max_wait_ms=5.0),
            preprocess=PreprocessSpec(target_spacing=self.target_spacing, window=(40.0, 400.0)),
            auto_regions=self.auto_regions)
        server = ServerThread(cfg, encoder)
        self._stack.callback(server.stop)
        self.port = server.port
        self.timings["server_start_s"] = time.perf_counter() - t0
        self.client = self._stack.enter_context(RetrievalClient(f"127.0.0.1:{server.port}"))

    def _stop_triton(self, triton) -> None:
        triton.close()
        (self.repo / "triton.pid").unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def describe(self) -> str:
        return (f"tritonserver pid {self.triton.pid} gRPC {self.triton.grpc_url} "
                f"(ready in {self.timings['triton_start_s']:.1f} s), medseek server "
                f"127.0.0.1:{self.port}, encoder = Triton client of {self.spec.name}")


def ingest(site: RunningSite, corpus: Path, records: list[ManifestRecord],
           with_regions: bool = False, batch: int = 32, collection: str = "") -> dict:
    """Stream ``records`` to the server through ``Ingest`` (into ``collection``; empty: the
    default of their kind), each with its report text (``IngestItem.report``, what report
    drafts are composed from); totals of the acknowledgements."""
    totals = {"inserted": 0, "updated": 0, "duplicates": 0, "acks": 0}
    reports = report_texts(corpus)
    for s in range(0, len(records), batch):
        items = [ingest_item(corpus, r, with_regions, collection, reports)
                 for r in records[s:s + batch]]
        resp = site.client.ingest(items, timeout=600.0)
        for key in ("inserted", "updated", "duplicates"):
            totals[key] += getattr(resp, key)
        totals["acks"] += len(resp.acks)
    return totals


def image_request(corpus: Path, rec: ManifestRecord, k: int, region: str | None = None):
    from medseek.serve.v1 import retrieval_pb2 as pb

    req = pb.SearchRequest(k=k, **{rec.kind: (corpus / rec.path).read_bytes()})
    if region is not None:
        box = next(r.box for r in rec.regions if r.name == region)
        req.region.name = region
        req.region.box.CopyFrom(pb.Box(x0=box[0], y0=box[1], x1=box[2], y1=box[3]))
    return req


def format_hits(resp, max_concepts: int = 3) -> str:
    """The ranked table: rank, id, score, labels, provenance pseudonyms, region, concepts."""
    rows = [("#", "id", "score", "labels", "patient / study", "region", "explaining concepts")]
    for n, h in enumerate(resp.hits, 1):
        region = h.matched_region
        if region and h.HasField("region_score"):
            region = f"{region} ({h.region_score:.3f})"
        rows.append((str(n), h.id, f"{h.score:.3f}", ",".join(h.item.labels) or "-",
                     f"{h.item.patient_pseudonym} / {h.item.study_pseudonym}", region or "-",
                     ", ".join(c.name for c in h.concepts[:max_concepts]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"{len(resp.hits)} hits of {resp.candidates} candidates, server search "
                 f"{resp.timings_ms.get('total', 0.0):.1f} ms")
    return "\n".join(lines)


@dataclass
class Metrics:
    name: str
    n_queries: int
    ndcg: tuple[float, float, float]
    precision: tuple[float, float, float]
    chance_precision: float

    def line(self, k: int) -> str:
        n, p = self.ndcg, self.precision
        return (f"{self.name:34s} nDCG@{k} {n[0]:.3f} [{n[1]:.3f}, {n[2]:.3f}]  "
                f"P@{k} {p[0]:.3f} [{p[1]:.3f}, {p[2]:.3f}]  (chance P@{k} "
                f"{self.chance_precision:.3f}; {self.n_queries} held-out queries)")

    def to_dict(self) -> dict:
        return {"n_queries": self.n_queries, "ndcg": list(self.ndcg),
                "precision": list(self.precision), "chance_precision": self.chance_precision}


def heldout_metrics(name: str, responses: list, queries: list[ManifestRecord],
                    archive: list[ManifestRecord], k: int, seed: int = 0) -> Metrics:
    """Label-overlap nDCG@k (Jaccard gains) and precision@k (any shared label) of the
    server's answers to the held-out queries, with 95 % bootstrap intervals."""
    from medseek.eval.bootstrap import bootstrap_ci
    from medseek.eval.metrics import label_overlap_relevance, ndcg_at_k, precision_at_k

    names = sorted({lab for r in [*queries, *archive] for lab in r.labels})
    col = {n: j for j, n in enumerate(names)}

    def multi_hot(rows):
        m = np.zeros((len(rows), len(names)), dtype=bool)
        for i, r in enumerate(rows):
            m[i, [col[lab] for lab in r.labels]] = True
        return m

    index = {r.id: j for j, r in enumerate(archive)}
    scores = np.full((len(queries), len(archive)), -10.0)  # not returned: below every hit
    for i, resp in enumerate(responses):
        for h in resp.hits:
            scores[i, index[h.id]] = h.score
    qlab, alab = multi_hot(queries), multi_hot(archive)
    kk = min(k, len(archive))
    ndcg = ndcg_at_k(scores, label_overlap_relevance(qlab, alab, "jaccard"), kk)
    rel_any = label_overlap_relevance(qlab, alab, "any")
    prec = precision_at_k(scores, rel_any, kk)
    return Metrics(name, len(queries), bootstrap_ci(ndcg, n_boot=500, seed=seed),
                   bootstrap_ci(prec, n_boot=500, seed=seed), float(rel_any.mean()))
