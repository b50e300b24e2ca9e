"""Configuration of the retrieval server: dataclasses, loaded from JSON or TOML by the CLI."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from medseek.index.faiss_config import FaissConfig, MilvusConfig
from medseek.io import DeidConfig, ReadLimits
from medseek.search import SearchConfig

from .draft_llm import DraftConfig

_MIB = 1024 * 1024

#: What the server's readers accept of one upload (``ServeConfig.limits``), tighter than a
#: batch job's ``ReadLimits()``: a request is costed from its headers before anything is
#: inflated or decoded, and a volume request then holds about two decoded volumes at once
#: (``medseek.io.nifti``). 256 MiB of decoded pixels is a 512 x 512 x 512 int16 CT, about
#: what fits a 64 MiB message (``max_receive_message_bytes``) once CT compresses ~3-4x.
SERVE_LIMITS = ReadLimits(
    max_file_bytes=256 * _MIB,
    max_voxels=128 * _MIB,  # 512 x 512 x 512
    max_decoded_bytes=256 * _MIB,
    max_zip_uncompressed_bytes=288 * _MIB,  # the decoded pixels plus the DICOM headers
)


@dataclass(frozen=True)
class RequestBudget:
    """What one request may cost the server beyond what ``ReadLimits`` bounds; each is
    checked before the work it bounds starts, and a request over one is refused with
    RESOURCE_EXHAUSTED and a message naming the budget and its value.

    Attributes
    ----------
    max_text_bytes : int
        UTF-8 bytes of one text (a query or a report). The towers truncate to their
        context (128-256 tokens), but the tokenizer and the report concept extraction
        read all of it, on the one encoder thread every query waits for: 32 KiB is ten
        times a long CT report, and costs milliseconds.
    max_resampled_voxels : int
        Voxels of a volume once resampled to the served spacing, computed from its shape
        and voxel spacing before resampling (a few-byte NIfTI declaring a huge spacing
        asks for billions). 32 Mi voxels (128 MiB of float32) is 320 x 320 x 320 voxels:
        a 1.5 mm whole-body CT at 4 mm.
    max_ids : int
        Ids of one Get or Delete (counted as sent; repeats are then answered once).
    """

    max_text_bytes: int = 32 * 1024
    max_resampled_voxels: int = 32 * _MIB
    max_ids: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_text_bytes", "max_resampled_voxels", "max_ids"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RequestBudget.{name} must be a positive int, got {value!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listen address) is reachable from this machine only."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name (or "" = every interface): may be reachable
        return False


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching and the bounded request queue.

    Attributes
    ----------
    max_batch : int
        Most requests merged into one encoder (or index) call.
    max_wait_ms : float
        How long the first request of a batch waits for company.
    max_queue : int
        Requests waiting beyond this many are refused with RESOURCE_EXHAUSTED.
    linger : float
        A batch smaller than the largest of the last 8 keeps waiting for company (while
        fewer than that many are queued) up to this fraction of the last batch's run
        time, when that is longer than ``max_wait_ms``. Under steady load the callers of
        one batch then join the next one instead of splitting the load into small
        batches, each paying a full pass over a flat index; a lone caller never waits
        longer than ``max_wait_ms`` once the recent batches were of one. 0: off.
    """

    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 256
    linger: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not 0.0 <= self.linger <= 1.0:
            raise ValueError(f"linger must be in [0, 1], got {self.linger}")


@dataclass(frozen=True)
class EncodeLane:
    """One encode lane (``EncodeLanes``): its own encoder worker(s), decode threads and
    bounded queue, so that work of one kind never waits behind another kind's.

    Attributes
    ----------
    workers : int
        Micro-batches of this lane encoded at once, each on its own thread.
    decode_threads : int
        Threads decoding this lane's uploads (pixels, de-identification, resampling).
        Text needs none: it is decoded on the event loop (a UTF-8 check and a hash of at
        most ``RequestBudget.max_text_bytes``).
    max_queue : int, optional
        Requests of this lane waiting at once (for a decode thread, or decoded and
        waiting for the encoder); one more is refused with RESOURCE_EXHAUSTED naming the
        lane, and nothing of the other lanes is touched. None: ``encode_batch.max_queue``.
    max_queued_bytes : int, optional
        Upload bytes of this lane's requests waiting to be decoded, at once: what the
        queue holds in memory, counted by work and not by requests (32 queued CT uploads
        of 21 MB are 670 MB). A request that would go over is refused with
        RESOURCE_EXHAUSTED naming the lane and this budget, unless the lane is empty (one
        upload is bounded by ``max_receive_message_bytes``). None: no byte budget.
    nice : int
        Scheduling niceness (0-19, Linux) of the lane's decode and encoder threads: a
        heavy lane at 10 gives way on busy cores to the light lane's threads and the event
        loop. Threads an encoder library starts from them (intra-op pools) inherit it.
    """

    workers: int = 1
    decode_threads: int = 1
    max_queue: int | None = None
    max_queued_bytes: int | None = None
    nice: int = 0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {self.decode_threads!r}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {self.max_queue!r}")
        if self.max_queued_bytes is not None and self.max_queued_bytes < 1:
            raise ValueError(f"max_queued_bytes must be >= 1 or None, got "
                             f"{self.max_queued_bytes!r}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice!r}")


@dataclass(frozen=True)
class EncodeLanes:
    """The encode lanes: ``text`` (queries and reports, also the hybrid report ranker's
    text), ``image`` (images, image regions) and ``volume`` (volumes, volume chunks).
    Each has its own workers, decode threads and queue (``EncodeLane``), so a light text
    query never queues behind heavy image or volume work, and a full heavy lane refuses
    its own requests only. Every lane micro-batches with ``ServeConfig.encode_batch``.
    A table of tables in a config file: ``[encode_lanes.volume]`` ``max_queue = 16``.
    """

    text: EncodeLane = EncodeLane()
    image: EncodeLane = EncodeLane(decode_threads=2, max_queued_bytes=256 * 2**20, nice=10)
    volume: EncodeLane = EncodeLane(decode_threads=2, max_queue=32,
                                    max_queued_bytes=512 * 2**20, nice=10)

    def __post_init__(self) -> None:
        for name in ("text", "image", "volume"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, EncodeLane(**value))
            elif not isinstance(value, EncodeLane):
                raise ValueError(f"encode_lanes.{name} must be an EncodeLane or a table, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class PreprocessSpec:
    """How uploaded pixels become encoder input.

    Attributes
    ----------
    image_size : (int, int)
        Radiographs are resized to (H, W) and scaled to [0, 1] by their own min and max.
    target_spacing : float or (float, float, float)
        Volumes are resampled to this spacing (mm; one number: isotropic; three: z, y, x) ...
    window : (float, float)
        ... and windowed with (center, width) into [0, 1]; H and W are then zero-padded
        (bottom, right) to multiples of ``volume_multiple`` (the volume model's patch
        (py, px)), as in training.

    The server replaces ``image_size``, ``volume_multiple``, and for a volume model whose
    spec records them ``target_spacing`` and ``window``, by what its encoder declares
    (``medseek.serve.routed.input_geometry``): a model is served with the preprocessing it
    was trained and measured with.
    """

    image_size: tuple[int, int] = (64, 64)
    target_spacing: float | tuple[float, float, float] = 4.0
    window: tuple[float, float] = (40.0, 400.0)
    volume_multiple: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be two positive ints, got {self.image_size!r}")
        object.__setattr__(self, "image_size", size)
        spacing = self.target_spacing
        if isinstance(spacing, (list, tuple)):
            spacing = tuple(float(v) for v in spacing)
            if len(spacing) != 3:
                raise ValueError(f"target_spacing must be one number or (z, y, x), got {spacing!r}")
            object.__setattr__(self, "target_spacing", spacing)
        if not all(v > 0 for v in (spacing if isinstance(spacing, tuple) else (spacing,))):
            raise ValueError(f"target_spacing must be > 0 mm, got {self.target_spacing!r}")
        window = tuple(float(v) for v in self.window)
        if len(window) != 2 or not window[1] > 0:
            raise ValueError(f"window must be (center, width > 0), got {self.window!r}")
        object.__setattr__(self, "window", window)
        multiple = tuple(int(v) for v in self.volume_multiple)
        if len(multiple) != 2 or min(multiple) < 1:
            raise ValueError(f"volume_multiple must be two ints >= 1, got {self.volume_multiple!r}")
        object.__setattr__(self, "volume_multiple", multiple)


@dataclass(frozen=True)
class ServeConfig:
    """Everything the server needs.

    Attributes
    ----------
    store_path : Path
        The SQLite store (source of truth).
    index_dir : Path
        Saved FAISS indexes (a cache; rebuilt from the store when missing).
    host, port : str, int
        Listen address; 127.0.0.1 unless deliberately exposed; port 0 picks a free one.
        A host other than loopback needs ``tokens`` or TLS (``tls_cert``/``tls_key``),
        unless ``insecure_public`` says otherwise.
    insecure_public : bool
        Allow a non-loopback ``host`` with neither tokens nor TLS (anyone who reaches the
        port can read and erase the archive); the CLI's ``--insecure-public``.
    index : FaissConfig or MilvusConfig
        The ANN index of every collection: exact ``flat`` (default), ``hnsw`` or ``ivfpq``
        FAISS (moved to a GPU when FAISS sees one, ``use_gpu``), or a Milvus server
        (``kind = "milvus"`` with its ``uri``). Candidates of an index that scores from
        compressed codes (IVF-PQ, Milvus PQ/SQ) are re-scored exactly from the store's
        vectors. In a config file: an ``index`` table with ``kind`` and that kind's fields.
    index_per_collection : mapping of str to FaissConfig or MilvusConfig
        Overrides by collection name, e.g. an exact index for a small ``report``
        collection beside an HNSW ``image`` one.
    workers : int
        Server processes sharing ``port`` (``SO_REUSEPORT``: the kernel spreads
        connections over them) and the store (``medseek.serve.workers``). Each holds its
        own index, caught up from the store's changelog before every search batch, so a
        write acknowledged by one worker is seen by the next search of any worker.
    draft : DraftConfig
        How ``Draft`` writes a report (the ``[draft]`` table; ``medseek.serve.draft_llm``).
    auto_regions : bool
        Find named regions with the shipped localisers (``medseek.serve.auto_regions``):
        an image ingested without ``regions`` whose body part a localiser covers (WRIST,
        HAND; CHEST in a PA/AP view) gets its boxes as region children marked automatic,
        and a region query with a name but no box gets the localiser's box on the query
        image. Off by default (trained on phantoms); the CLI's ``--auto-regions``.
    model : str
        Embedding model tag of the store's vectors.
    tokens : tuple of str
        Accepted bearer tokens; empty disables authentication (local use only).
    deid : DeidConfig, optional
        Key of ingest-time de-identification of DICOM; None refuses DICOM uploads.
    tls_cert, tls_key : Path, optional
        PEM files; both set: the port is served over TLS.
    max_receive_message_bytes, max_send_message_bytes : int
        gRPC message limits; a larger message gets RESOURCE_EXHAUSTED from gRPC itself.
    grace_s : float
        Shutdown waits this long for in-flight requests.
    metrics_port : int, optional
        Prometheus metrics on 127.0.0.1:<port> (0 picks one); None: off.
    encode_batch, search_batch : BatchConfig
        Micro-batching of the encoder (each encode lane's) and of the index (searches
        linger: 0.25).
    encode_lanes : EncodeLanes
        The encoder's lanes (text, image, volume): workers, decode threads and a bounded
        queue each (defaults: 1 worker each; 2 decode threads for images and for
        volumes, whose threads run at nice 10; the volume queue holds 32, the others
        ``encode_batch.max_queue``; uploads waiting to be decoded: at most 256 MiB of
        images and 512 MiB of volumes).
    stream_window : int
        Requests of one ``SearchStream`` the server holds at once (read and not yet
        answered); it reads no further until one is answered, so a client streaming faster
        than the server answers is held back by gRPC flow control instead of filling memory.
    search_threads : int
        Threads for the search steps after the ANN (store reads, rerank, diversify,
        explain), each with its own read-only SQLite connection; the ANN of the next
        micro-batch runs on the index thread meanwhile.
    faiss_threads : int
        OpenMP threads of FAISS searches (process-wide); 0: one per core but one, which is
        left to the search threads (at least 1). FAISS's own default, one per core, makes
        its threads spin against the search threads and collapses when the cores are busy.
    faiss_blas_min_batch : int, optional
        Exact (flat) searches of at least this many queries score them with one BLAS
        matrix product, reading the index once per batch instead of once per query
        (3x cheaper per query from 8 queries on, measured; 2x dearer for one query). Sets
        ``faiss.cvar.distance_compute_blas_threshold`` (process-wide) to this times the
        encoder's dim: faiss 1.15 compares queries x dim with it. None leaves FAISS's
        default (128000: BLAS only from 500 queries of dim 256 on).
    limits : ReadLimits
        What the readers accept of one upload (``SERVE_LIMITS``).
    budget : RequestBudget
        What one request may cost beyond that (text, resampled voxels, ids).
    report_ranker : {"hybrid", "joint"}, optional
        Embedding of the report collection (``medseek.serve.report_ranker``): ``hybrid``,
        MiniLM sentence embedding + laterality-aware finding concepts, embedded in process;
        ``joint``, the dual encoder's text tower. None: what the store's report collection
        already holds (an existing store keeps its embedding), ``hybrid`` for a new one.
    pacs_mode : {"research", "clinical"}
        ``research`` (the default, as before): hits carry pseudonyms only. ``clinical``
        (chosen explicitly, never by a default): the server also keeps, apart from the
        store, each DICOM item's original Study/Series/SOP Instance UIDs
        (``medseek.serve.reident``) and returns them with a viewer URL on the hits of a
        ``Search`` that asks ``reidentify``, to ``reident_tokens`` callers only, each such
        answer written first to ``audit_log``. Needs ``deid``, ``pacs_viewer_url`` and
        ``reident_tokens``.
    pacs_viewer_url : str, optional
        Clinical mode: the PACS viewer URL of a hit, a template with ``{study_uid}``
        (and optionally ``{series_uid}``, ``{sop_uid}``), e.g. OHIF's
        ``https://pacs/viewer?StudyInstanceUIDs={study_uid}``.
    reident_tokens : tuple of (name, token)
        Clinical mode: the callers allowed to re-identify; the name (never the token) is
        what the audit log records. Their tokens are also accepted bearer tokens. Read
        from ``reident_tokens_file``, one ``name token`` per line.
    reident_path, audit_log : Path, optional
        Clinical mode: the re-identification map (SQLite, mode 0600) and the audit log
        (JSON lines, mode 0600); default ``<store>.reident.sqlite`` and
        ``<store>.audit.jsonl``.
    """

    store_path: Path
    index_dir: Path
    host: str = "127.0.0.1"
    port: int = 50051
    model: str = "default"
    tokens: tuple[str, ...] = field(default=(), repr=False)
    deid: DeidConfig | None = field(default=None, repr=False)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_receive_message_bytes: int = 64 * _MIB
    max_send_message_bytes: int = 64 * _MIB
    grace_s: float = 10.0
    metrics_port: int | None = None
    encode_batch: BatchConfig = BatchConfig()
    encode_lanes: EncodeLanes = EncodeLanes()
    search_batch: BatchConfig = BatchConfig(linger=0.25)
    search: SearchConfig = SearchConfig()
    stream_window: int = 32
    search_threads: int = 2
    faiss_threads: int = 0
    faiss_blas_min_batch: int | None = 3
    preprocess: PreprocessSpec = PreprocessSpec()
    limits: ReadLimits = SERVE_LIMITS
    budget: RequestBudget = RequestBudget()
    report_ranker: str | None = None
    insecure_public: bool = False
    pacs_mode: str = "research"
    pacs_viewer_url: str | None = None
    reident_tokens: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    reident_path: Path | None = None
    audit_log: Path | None = None
    index: FaissConfig | MilvusConfig = FaissConfig()
    index_per_collection: dict = field(default_factory=dict)
    workers: int = 1
    draft: DraftConfig = DraftConfig()
    auto_regions: bool = False

    def __post_init__(self) -> None:
        for cfg in (self.index, *self.index_per_collection.values()):
            if not isinstance(cfg, (FaissConfig, MilvusConfig)):
                raise ValueError(f"index must be a FaissConfig or MilvusConfig, got {cfg!r}")
        object.__setattr__(self, "index_per_collection", dict(self.index_per_collection))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.report_ranker not in (None, "hybrid", "joint"):
            raise ValueError(f"report_ranker must be 'hybrid', 'joint' or None, "
                             f"got {self.report_ranker!r}")
        object.__setattr__(self, "store_path", Path(self.store_path))
        object.__setattr__(self, "index_dir", Path(self.index_dir))
        if not 0 <= int(self.port) <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        tokens = (self.tokens,) if isinstance(self.tokens, str) else tuple(self.tokens)
        if any(not isinstance(t, str) or len(t) < 8 for t in tokens):
            raise ValueError("tokens must be str of at least 8 characters")
        object.__setattr__(self, "tokens", tokens)
        self._check_pacs_mode()
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together, got one of them")
        if not (is_loopback(self.host) or tokens or self.tls_cert is not None
                or self.insecure_public):
            raise ValueError(
                f"host {self.host!r} is not loopback, and the server has neither tokens "
                f"(tokens_file) nor TLS (tls_cert, tls_key): anyone who reaches it could read "
                f"and erase the archive. Configure one, bind 127.0.0.1, or set "
                f"insecure_public = true (--insecure-public) to accept that.")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            if getattr(self, name) < 1024:
                raise ValueError(f"{name} must be >= 1024, got {getattr(self, name)!r}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s!r}")
        if self.stream_window < 1:
            raise ValueError(f"stream_window must be >= 1, got {self.stream_window!r}")
        if self.search_threads < 1:
            raise ValueError(f"search_threads must be >= 1, got {self.search_threads!r}")
        if self.faiss_threads < 0:
            raise ValueError(f"faiss_threads must be >= 0 (0: cores - 1), "
                             f"got {self.faiss_threads!r}")
        if self.faiss_blas_min_batch is not None and self.faiss_blas_min_batch < 1:
            raise ValueError(f"faiss_blas_min_batch must be >= 1 or None, "
                             f"got {self.faiss_blas_min_batch!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(
                f"metrics_port must be in [0, 65535] or None, got {self.metrics_port!r}")

    def _check_pacs_mode(self) -> None:
        """Clinical mode's needs (``pacs_mode``); its callers' tokens join ``tokens``."""
        if self.pacs_mode not in ("research", "clinical"):
            raise ValueError(f"pacs_mode must be 'research' or 'clinical', got {self.pacs_mode!r}")
        named = tuple(tuple(p) for p in self.reident_tokens)
        if any(len(p) != 2 or not all(isinstance(v, str) for v in p) for p in named):
            raise ValueError("reident_tokens must be (name, token) pairs of str")
        if self.pacs_mode == "research":
            extra = [n for n, v in (("pacs_viewer_url", self.pacs_viewer_url),
                                    ("reident_tokens", named), ("reident_path", self.reident_path),
                                    ("audit_log", self.audit_log)) if v]
            if extra:
                raise ValueError(f"{', '.join(extra)} are for pacs_mode 'clinical'; the server "
                                 f"is in pacs_mode 'research' (set pacs_mode = 'clinical' "
                                 f"explicitly to re-identify)")
            return
        from .reident import check_viewer_template

        if self.deid is None:
            raise ValueError("pacs_mode 'clinical' needs deid (deid_key_file): the store "
                             "stays de-identified, the UIDs are kept apart")
        if self.pacs_viewer_url is None:
            raise ValueError("pacs_mode 'clinical' needs pacs_viewer_url (a template with "
                             "{study_uid})")
        check_viewer_template(self.pacs_viewer_url)
        if not named:
            raise ValueError("pacs_mode 'clinical' needs reident_tokens (reident_tokens_file: "
                             "'name token' lines): nobody could re-identify otherwise")
        names = [n for n, _ in named]
        if (any(not n or not n.isprintable() or " " in n for n in names)
                or len(set(names)) != len(names)):
            raise ValueError("reident_tokens names must be unique, non-empty, printable and "
                             "without spaces")
        if any(len(t) < 8 for _, t in named):
            raise ValueError("reident_tokens tokens must be at least 8 characters")
        object.__setattr__(self, "reident_tokens", named)
        object.__setattr__(self, "tokens", tuple(dict.fromkeys(
            (*self.tokens, *(t for _, t in named)))))
        store = Path(self.store_path)
        object.__setattr__(self, "reident_path", Path(
            self.reident_path or store.with_name(store.name + ".reident.sqlite")))
        object.__setattr__(self, "audit_log", Path(
            self.audit_log or store.with_name(store.name + ".audit.jsonl")))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


_SECTIONS = {"encode_batch": BatchConfig, "encode_lanes": EncodeLanes,
             "search_batch": BatchConfig,
             "search": SearchConfig, "preprocess": PreprocessSpec, "limits": ReadLimits,
             "budget": RequestBudget, "draft": DraftConfig}


def index_config(raw: dict, where: str = "index",
                 base: Path | None = None) -> FaissConfig | MilvusConfig:
    """The index config of a table ``{kind = "flat" | "hnsw" | "ivfpq" | "milvus", ...}``:
    the other keys are that kind's fields (``FaissConfig`` or ``MilvusConfig``). A Milvus
    ``token_file`` is read, never an inline token; it and a milvus-lite ``.db`` path are
    taken relative to ``base``."""
    base = Path.cwd() if base is None else Path(base)
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a table/object with a 'kind', got {raw!r}")
    raw = dict(raw)
    kind = raw.get("kind", "flat")
    cls = MilvusConfig if kind == "milvus" else FaissConfig
    if cls is MilvusConfig:
        raw.pop("kind")
        if "token" in raw:
            raise ValueError(f"{where}: give the Milvus credentials as token_file, not inline")
        if "token_file" in raw:
            raw["token"] = (base / raw.pop("token_file")).read_text().strip()
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for kind {kind!r}; known: "
                         f"{sorted(known - {'token'})}")
    try:
        cfg = cls(**raw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    if isinstance(cfg, MilvusConfig) and cfg.is_local:
        cfg = replace(cfg, uri=str(base / cfg.uri))
    return cfg


def config_from_dict(raw: dict, base_dir: Path | None = None, **overrides) -> ServeConfig:
    """A ``ServeConfig`` from a JSON/TOML mapping.

    Secrets are read from files, never inline: ``tokens_file`` (one token per line) and
    ``deid_key_file`` (the raw key bytes). Relative paths are taken from ``base_dir``. A
    ``limits`` table changes only the fields it names of ``SERVE_LIMITS``. Keyword
    overrides (not None) replace fields before the whole is checked, so that, e.g., a
    ``host`` override is checked with the file's tokens.
    """
    raw = dict(raw)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    known = {f.name for f in fields(ServeConfig)} - {"tokens", "deid"}
    secrets = {"tokens_file", "deid_key_file", "reident_tokens_file"}
    known -= {"reident_tokens"}
    unknown = sorted(set(raw) - known - secrets)
    if unknown:
        raise ValueError(f"unknown serve config keys {unknown}; known: {sorted(known)}")
    kwargs = {}
    for key, value in raw.items():
        if key == "index":
            kwargs[key] = index_config(value, "index", base)
        elif key == "index_per_collection":
            if not isinstance(value, dict):
                raise ValueError(f"index_per_collection must be a table/object, got {value!r}")
            kwargs[key] = {name: index_config(v, f"index_per_collection.{name}", base)
                           for name, v in value.items()}
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be a table/object, got {value!r}")
            kwargs[key] = (replace(SERVE_LIMITS, **value) if key == "limits"
                           else _SECTIONS[key](**value))
        elif key in ("store_path", "index_dir", "tls_cert", "tls_key", "reident_path",
                     "audit_log"):
            kwargs[key] = base / value
        elif key == "reident_tokens_file":
            kwargs["reident_tokens"] = named_tokens((base / value).read_text(), value)
        elif key == "tokens_file":
            lines = (base / value).read_text().splitlines()
            kwargs["tokens"] = tuple(t.strip() for t in lines if t.strip())
        elif key == "deid_key_file":
            kwargs["deid"] = DeidConfig(key=(base / value).read_bytes().strip())
        else:
            kwargs[key] = value
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig(**kwargs)


def named_tokens(text: str, source: str) -> tuple[tuple[str, str], ...]:
    """``name token`` lines (blank lines and ``#`` comments skipped) -> pairs; a bad line
    is named by its number, never quoted (it holds a token)."""
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}:{n}: expected 'name token', got {len(parts)} fields")
        pairs.append((parts[0], parts[1]))
    return tuple(pairs)


def load_config(path: str | Path, **overrides) -> ServeConfig:
    """Read a ``.json`` or ``.toml`` serve config; keyword overrides replace fields."""
    path = Path(path)
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raise ValueError(f"path must end in .json or .toml, got {str(path)!r}")
    return config_from_dict(raw, path.parent, **overrides)
