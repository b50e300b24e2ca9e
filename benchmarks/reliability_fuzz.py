"""Mutation fuzzing of ``medseek.v1.Retrieval`` through a real gRPC channel.

A case is fixed by ``(run seed, case number)``: a target (Search / Ingest / Diagnose with
image, volume or text content; raw protobuf bytes to any method; absurd structured fields;
a stream fault; a bomb; an oversize message), a seed file and a mutation. Each request has
a deadline. Outcomes:

* crash: the server process died;
* hang: DEADLINE_EXCEEDED while the server is alive (not for the cases whose deadline is
  deliberately tiny, nor the half-open stream that is meant to run into its deadline);
* internal: INTERNAL or UNKNOWN as the call's status, or INTERNAL inside an Ingest ack or a
  SearchStream response (a handler that raised, or an error classified as our own bug);
* everything else is counted by status code.
"""

from __future__ import annotations

import random
import threading
import time
import warnings
from dataclasses import dataclass, field

import grpc

from medseek.serve.client import upload_chunks
from medseek.serve.v1 import retrieval_pb2 as pb
from medseek.serve.v1 import retrieval_pb2_grpc as pb_grpc

import reliability_seeds as seeds

SERVICE = "/medseek.v1.Retrieval/"
INTERNAL_NUMBERS = (grpc.StatusCode.INTERNAL.value[0], grpc.StatusCode.UNKNOWN.value[0])
WEIRD_FLOATS = (float("nan"), float("inf"), float("-inf"), -1e38, 3.4e38, 0.0, -0.0, 1e-45,
                -1.0, 1.0000001, 63.0, 48.0)
WEIRD_IDS = ("", "a" * 10000, "\x00", "x/chunk/0", "base-img/region/centre", "\n", " id ",
             "../..", "%00", "\u202e", "base-img", "base-vol", "base-txt", "fz-1")
WEIRD_COLLECTIONS = ("", "image", "report", "volume", "chunk", "region", "nope", "\x00",
                     "a" * 5000)
WEIRD_K = (0, 1, 1000, 1001, 2**31, 2**32 - 1)


@dataclass
class Case:
    n: int
    target: str
    seed: str = ""
    mutation: str = ""
    payload: bytes = b""
    deadline: float = 60.0
    expect_deadline: bool = False  # a deadline that is meant to pass (not a hang)
    call: object = None  # (stub, metadata, deadline) -> response(s); built by make_case


@dataclass
class Outcome:
    n: int
    target: str
    seed: str
    mutation: str
    code: str
    kind: str  # ok | status | internal | hang | crash | expected-deadline
    detail: str = ""
    elapsed: float = 0.0
    responses: list = field(default_factory=list)  # serialized bytes (for the PHI grep)


def _weighted(rng, table):
    total = sum(w for _, w in table)
    r = rng.random() * total
    for name, w in table:
        r -= w
        if r < 0:
            return name
    return table[-1][0]


TARGETS = (("search.image", 12), ("search.volume", 10), ("search.text", 5),
           ("ingest.image", 10), ("ingest.volume", 10), ("ingest.text", 4),
           ("diagnose.image", 3), ("diagnose.volume", 3), ("bomb", 3), ("raw", 16),
           ("fields", 13), ("stream", 8), ("oversize", 1))


class CaseFactory:
    """Builds case ``n`` of a run (deterministic in ``(seed, n)``)."""

    def __init__(self, corpus: dict, run_seed: int, max_message_bytes: int) -> None:
        self.corpus, self.run_seed, self.max_message = corpus, run_seed, max_message_bytes
        self.pool = [d for kind in ("image", "volume") for d in corpus[kind].values()]
        self.proto_seeds = self._proto_seeds()

    def _proto_seeds(self) -> dict[str, tuple[str, bytes]]:
        img, vol = self.corpus["image"]["png-grey"], self.corpus["volume"]["nifti-synth"]
        box = pb.Box(x0=4, y0=4, x1=30, y1=30)
        return {
            "search-image": ("Search", pb.SearchRequest(image=img, k=3, diversify=True,
                                                        region=pb.Region(name="c", box=box))
                             .SerializeToString()),
            "search-text": ("Search", pb.SearchRequest(text=seeds.REPORTS[0], k=5,
                                                       filters=pb.Filters(labels_any=["x"]))
                            .SerializeToString()),
            "search-volume": ("Search", pb.SearchRequest(volume=vol, k=2).SerializeToString()),
            "search-item": ("Search", pb.SearchRequest(item_id="base-img", k=2)
                            .SerializeToString()),
            # the head of a SearchUpload; its chunks follow it unmutated (``_raw``)
            "upload-volume": ("SearchUpload", next(upload_chunks(
                pb.SearchRequest(volume=vol, k=2))).SerializeToString()),
            "ingest-image": ("Ingest", pb.IngestItem(
                id="raw-img", image=img, labels=["a"], regions=[pb.Region(name="c", box=box)])
                .SerializeToString()),
            "ingest-volume": ("Ingest", pb.IngestItem(
                id="raw-vol", volume=vol, regions=[pb.Region(
                    name="liver", z_range=pb.ZRange(z_start=1, z_end=5))]).SerializeToString()),
            "ingest-text": ("Ingest", pb.IngestItem(id="raw-txt", text=seeds.REPORTS[1])
                            .SerializeToString()),
            "get": ("Get", pb.GetRequest(ids=["base-img", "base-txt"], with_embedding=True)
                    .SerializeToString()),
            "delete": ("Delete", pb.DeleteRequest(ids=["raw-txt"]).SerializeToString()),
            "diagnose": ("Diagnose", pb.DiagnoseRequest(text=seeds.REPORTS[2], k=3,
                                                        temperature=0.5).SerializeToString()),
            "stats": ("Stats", b""),
        }

    def make(self, n: int) -> Case:
        rng = random.Random(f"{self.run_seed}:{n}")
        target = _weighted(rng, TARGETS)
        with warnings.catch_warnings():  # pydicom/nibabel on mutated seeds: same cases
            warnings.simplefilter("ignore")  # under pytest's "error" filter as without it
            return getattr(self, "_" + target.split(".")[0])(rng, Case(n, target))

    # -- content through the typed API ------------------------------------------------------
    def _content(self, rng, case: Case, kind: str):
        if kind == "text":
            case.seed = rng.choice(sorted(self.corpus["text"]))
            case.mutation, text = seeds.mutate_text(rng, self.corpus["text"][case.seed], self.pool)
            case.payload = text.encode("utf-8", "surrogatepass")
            return text
        case.seed = rng.choice(sorted(self.corpus[kind]))
        case.mutation, data = seeds.mutate_bytes(rng, self.corpus[kind][case.seed], self.pool)
        case.payload = data
        return data

    def _search(self, rng, case: Case) -> Case:
        kind = case.target.split(".")[1]
        value = self._content(rng, case, kind)
        req = pb.SearchRequest(k=rng.choice((0, 1, 5, 10)), diversify=rng.random() < 0.3,
                               **{kind: value})
        if kind == "image" and rng.random() < 0.3:
            req.region.CopyFrom(pb.Region(name="q", box=pb.Box(
                x0=rng.choice((0, 5, -3)), y0=2, x1=rng.choice((20, 47, 4000)), y1=30)))
        if kind == "volume" and rng.random() < 0.2:
            req.region.CopyFrom(pb.Region(name="q", z_range=pb.ZRange(
                z_start=rng.choice((0, 2, 9)), z_end=rng.choice((1, 6, 10**6)))))
        case.call = lambda stub, md, t: stub.Search(req, timeout=t, metadata=md)
        return case

    def _diagnose(self, rng, case: Case) -> Case:
        kind = case.target.split(".")[1]
        req = pb.DiagnoseRequest(k=rng.choice((0, 3)), **{kind: self._content(rng, case, kind)})
        case.call = lambda stub, md, t: stub.Diagnose(req, timeout=t, metadata=md)
        return case

    def _ingest(self, rng, case: Case) -> Case:
        kind = case.target.split(".")[1]
        item = pb.IngestItem(id=f"fz-{case.n}", labels=rng.sample(("a", "b", "effusion"), 2),
                             **{kind: self._content(rng, case, kind)})
        if kind == "image" and rng.random() < 0.4:
            item.regions.append(pb.Region(name="r", box=pb.Box(
                x0=rng.choice(WEIRD_FLOATS), y0=1, x1=rng.choice((20.0, *WEIRD_FLOATS)), y1=30)))
        if kind == "volume" and rng.random() < 0.4:
            item.regions.append(pb.Region(name="organ", z_range=pb.ZRange(
                z_start=rng.choice((0, 3, 2**32 - 1)), z_end=rng.choice((0, 5, 2**32 - 1)))))
        items = [item] + ([pb.IngestItem(id=f"fz-{case.n}-t", text="Heart size normal.")]
                          if rng.random() < 0.3 else [])
        case.call = lambda stub, md, t: stub.Ingest(iter(items), timeout=t, metadata=md)
        return case

    def _bomb(self, rng, case: Case) -> Case:
        case.seed = rng.choice(sorted(self.corpus["bomb"]))
        case.mutation, data = "bomb", self.corpus["bomb"][case.seed]
        case.payload = data
        field_ = rng.choice(("image", "volume"))
        if rng.random() < 0.5:
            req = pb.SearchRequest(**{field_: data})
            case.call = lambda stub, md, t: stub.Search(req, timeout=t, metadata=md)
        else:
            item = pb.IngestItem(id=f"fz-{case.n}", **{field_: data})
            case.call = lambda stub, md, t: stub.Ingest(iter([item]), timeout=t, metadata=md)
        return case

    def _oversize(self, rng, case: Case) -> Case:
        case.seed, case.mutation = "png-grey", "oversize"
        data = self.corpus["image"]["png-grey"] + b"\x00" * (self.max_message + 1024)
        req = pb.SearchRequest(image=data)
        case.call = lambda stub, md, t: stub.Search(req, timeout=t, metadata=md)
        return case

    # -- raw protobuf bytes through a generic channel -------------------------------------------
    def _raw(self, rng, case: Case) -> Case:
        case.seed = rng.choice(sorted(self.proto_seeds))
        method, data = self.proto_seeds[case.seed]
        if rng.random() < 0.1:
            case.mutation, data = "random-bytes", bytes(rng.getrandbits(8)
                                                        for _ in range(rng.randint(0, 200)))
        else:
            case.mutation, data = seeds.mutate_bytes(rng, data, [d for _, d in
                                                                 self.proto_seeds.values()])
        if rng.random() < 0.2:
            method = rng.choice(("Search", "SearchStream", "SearchUpload", "Ingest", "Get",
                                 "Delete", "Stats", "Diagnose"))
            case.mutation += f"->{method}"
        if method == "Search" and rng.random() < 0.3:
            method = "SearchStream"
        case.payload, case.target = data, f"raw.{method}"
        messages = [data] * rng.randint(1, 3)
        if method == "SearchUpload":  # the (mutated) head, then the volume's chunks
            vol = self.corpus["volume"]["nifti-synth"]
            messages = [data] + [m.SerializeToString() for m in upload_chunks(
                pb.SearchRequest(volume=vol), chunk_bytes=4096)][1:]
        case.call = lambda stub, md, t: raw_call(stub, method, messages, md, t)
        return case

    # -- absurd structured fields ---------------------------------------------------------------
    def _fields(self, rng, case: Case) -> Case:
        what = rng.choice(("search", "diagnose", "ingest", "get", "delete", "search-item"))
        case.target, case.seed, case.mutation = f"fields.{what}", what, "absurd-fields"
        f = lambda: rng.choice(WEIRD_FLOATS)  # noqa: E731
        region = pb.Region(name=rng.choice(("", "centre", "x" * 3000)),
                           box=pb.Box(x0=f(), y0=f(), x1=f(), y1=f()),
                           z_range=pb.ZRange(z_start=rng.choice((0, 5, 2**32 - 1)),
                                             z_end=rng.choice((0, 3, 2**32 - 1))))
        filters = pb.Filters(modality=[rng.choice(WEIRD_IDS)] * rng.choice((0, 1, 3000)),
                             labels_any=[rng.choice(("a", "", "\x00"))] * rng.choice((0, 2, 5000)),
                             exclude_patients=[rng.choice(WEIRD_IDS)] * rng.choice((0, 1, 2000)))
        query = rng.choice((("text", "effusion"), ("image", self.corpus["image"]["png-grey"]),
                            ("volume", self.corpus["volume"]["nifti-synth"]),
                            ("item_id", rng.choice(WEIRD_IDS))))
        if what == "search-item":
            query = ("item_id", rng.choice(("base-img", "base-vol", "base-txt")))
        common = dict(collection=rng.choice(WEIRD_COLLECTIONS), k=rng.choice(WEIRD_K),
                      filters=filters, **dict([query]))
        if rng.random() < 0.6:
            common["region"] = region
        if what in ("search", "search-item"):
            req = pb.SearchRequest(diversify=rng.random() < 0.5, request_id=rng.choice(WEIRD_IDS),
                                   **common)
            if rng.random() < 0.5:
                req.mmr_lambda = f()
            case.call = lambda stub, md, t: stub.Search(req, timeout=t, metadata=md)
        elif what == "diagnose":
            req = pb.DiagnoseRequest(**common)
            if rng.random() < 0.7:
                req.temperature = f()
            case.call = lambda stub, md, t: stub.Diagnose(req, timeout=t, metadata=md)
        elif what == "ingest":
            content = rng.choice((("text", "Left effusion."),
                                  ("image", self.corpus["image"]["png-grey"]),
                                  ("volume", self.corpus["volume"]["nifti-synth"])))
            items = [pb.IngestItem(id=rng.choice(WEIRD_IDS) + ("" if rng.random() < 0.5 else
                                                             f"-{case.n}-{i}"),
                                   collection=rng.choice(WEIRD_COLLECTIONS),
                                   labels=["l"] * rng.choice((0, 1, 5000)),
                                   patient_pseudonym=rng.choice(WEIRD_IDS),
                                   regions=[region] * rng.choice((0, 1, 300)),
                                   **dict([content])) for i in range(rng.randint(1, 3))]
            case.call = lambda stub, md, t: stub.Ingest(iter(items), timeout=t, metadata=md)
        else:
            ids = [rng.choice(WEIRD_IDS) for _ in range(rng.choice((0, 1, 5, 1024, 1025)))]
            if what == "get":
                req = pb.GetRequest(ids=ids, with_embedding=rng.random() < 0.5)
                case.call = lambda stub, md, t: stub.Get(req, timeout=t, metadata=md)
            else:
                req = pb.DeleteRequest(ids=[i for i in ids if not i.startswith("base-")])
                case.call = lambda stub, md, t: stub.Delete(req, timeout=t, metadata=md)
        return case

    # -- stream faults -----------------------------------------------------------------------
    def _stream(self, rng, case: Case) -> Case:
        fault = rng.choice(("ingest-cancel", "ingest-raise", "search-stream-cancel",
                            "search-stream-slow-reader", "tiny-deadline", "half-open",
                            "search-stream-garbage"))
        case.target, case.seed, case.mutation = f"stream.{fault}", fault, "stream-fault"
        img, text = self.corpus["image"]["png-grey"], seeds.REPORTS
        if fault in ("ingest-cancel", "ingest-raise"):
            stop = rng.randint(0, 6)

            def items():
                for i in range(8):
                    if fault == "ingest-raise" and i == stop:
                        raise RuntimeError("client-side fault")
                    yield pb.IngestItem(id=f"fz-{case.n}-{i}", image=img) if i % 2 else \
                        pb.IngestItem(id=f"fz-{case.n}-{i}", text=text[i % len(text)])

            delay = rng.uniform(0.0, 0.5)
            case.call = lambda stub, md, t: cancel_after(
                stub.Ingest.future(items(), timeout=t, metadata=md),
                delay if fault == "ingest-cancel" else None)
        elif fault.startswith("search-stream"):
            reqs = [pb.SearchRequest(text=text[i % len(text)], k=3, request_id=str(i))
                    for i in range(rng.randint(1, 60))]
            if fault == "search-stream-garbage":
                raw = [r.SerializeToString() for r in reqs]
                raw.insert(rng.randrange(len(raw) + 1), bytes(rng.getrandbits(8)
                                                              for _ in range(rng.randint(1, 40))))
                case.call = lambda stub, md, t: raw_call(stub, "SearchStream", raw, md, t)
            else:
                read, pause = rng.randint(0, 5), rng.uniform(0, 1.0)
                case.call = lambda stub, md, t: read_then_cancel(
                    stub.SearchStream(iter(reqs), timeout=t, metadata=md), read,
                    pause if fault.endswith("slow-reader") else 0.0)
        elif fault == "tiny-deadline":
            case.deadline, case.expect_deadline = rng.choice((0.001, 0.01, 0.05, 0.2)), True
            req = pb.SearchRequest(volume=self.corpus["volume"]["nifti-synth"], k=3)
            case.call = lambda stub, md, t: stub.Search(req, timeout=t, metadata=md)
        else:  # a stream whose client never half-closes: its deadline ends it
            case.deadline, case.expect_deadline = 2.0, True
            case.call = lambda stub, md, t: list(stub.SearchStream(
                never_closing(pb.SearchRequest(text="effusion", k=1)), timeout=t, metadata=md))
        return case


def never_closing(first):
    yield first
    threading.Event().wait(10.0)  # longer than the case's 2 s deadline


def cancel_after(future, delay: float | None):
    if delay is not None:
        time.sleep(delay)
        future.cancel()
    return future.result()


def read_then_cancel(call, n: int, pause: float):
    got = []
    for resp in call:
        got.append(resp)
        if pause:
            time.sleep(pause)
        if len(got) >= n:
            call.cancel()
            break
    return got


def raw_call(stub: "RawStub", method: str, messages: list[bytes], md, timeout):
    """``messages`` (bytes) sent to ``method`` as they are; the response bytes."""
    ch = stub.channel
    path = SERVICE + method
    if method in ("Ingest", "SearchUpload"):
        return ch.stream_unary(path)(iter(messages), timeout=timeout, metadata=md)
    if method == "SearchStream":
        return list(ch.stream_stream(path)(iter(messages), timeout=timeout, metadata=md))
    return ch.unary_unary(path)(messages[0], timeout=timeout, metadata=md)


class RawStub(pb_grpc.RetrievalStub):
    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.channel = channel


def embedded_internal(resp) -> str:
    """The message of an INTERNAL inside an OK response (an Ingest ack, a SearchStream
    response), or ''."""
    if isinstance(resp, (list, tuple)):
        return next((m for m in map(embedded_internal, resp) if m), "")
    if isinstance(resp, bytes):
        for kind in (pb.IngestResponse, pb.SearchResponse):
            try:
                msg = kind.FromString(resp)
            except Exception:  # noqa: BLE001 - not that message type
                continue
            if found := embedded_internal(msg):
                return found
        return ""
    if isinstance(resp, pb.IngestResponse):
        for ack in resp.acks:
            if ack.HasField("error") and ack.error.code in INTERNAL_NUMBERS:
                return f"ack {ack.index}: {ack.error.message}"
    if isinstance(resp, pb.SearchResponse) and resp.HasField("error") and \
            resp.error.code in INTERNAL_NUMBERS:
        return f"stream response: {resp.error.message}"
    return ""


def _serialized(resp) -> list[bytes]:
    if isinstance(resp, (list, tuple)):
        return [b for r in resp for b in _serialized(r)]
    if isinstance(resp, bytes):
        return [resp]
    return [resp.SerializeToString()] if hasattr(resp, "SerializeToString") else []


def run_case(case: Case, stub, metadata, alive) -> Outcome:
    """Run one case; ``alive()`` says whether the server process still runs."""
    out = Outcome(case.n, case.target, case.seed, case.mutation, "OK", "ok")
    t0 = time.monotonic()
    try:
        resp = case.call(stub, metadata, case.deadline)
        out.responses = _serialized(resp)
        if msg := embedded_internal(resp):
            out.kind, out.code, out.detail = "internal", "INTERNAL(embedded)", msg
    except grpc.FutureCancelledError:
        out.code, out.kind = "CANCELLED", "status"
    except grpc.RpcError as exc:
        code = exc.code()
        out.code, out.detail = code.name, (exc.details() or "")[:300]
        out.responses = [out.detail.encode("utf-8", "replace")]
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            client_side = case.target == "stream.ingest-raise" and code == grpc.StatusCode.UNKNOWN
            out.kind = "status" if client_side else "internal"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            out.kind = ("expected-deadline" if case.expect_deadline else
                        "hang" if alive() else "crash")
        elif code == grpc.StatusCode.UNAVAILABLE and not alive():
            out.kind = "crash"
        else:
            out.kind = "status"
    out.elapsed = time.monotonic() - t0
    if out.kind not in ("crash",) and not alive():
        out.kind = "crash"
    return out
