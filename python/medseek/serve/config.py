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
# ServeConfig's parts, importable from here as before
from .work_config import (SERVE_LIMITS, BatchConfig, EncodeLane, EncodeLanes,  # noqa: F401
                          PreprocessSpec, RequestBudget)

_MIB = 1024 * 1024


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
    upload_workers : int
        Server processes that take image and volume searches (uploads) off the process
        that answers text and item queries (``medseek.serve.workers``): 0, none (the
        default). They serve the whole API on ``upload_port``, share the store and catch
        up their index like ``workers``, and run at ``upload_nice`` below this process's
        priority; Stats advertises the port and ``RetrievalClient`` sends its image and
        volume searches there. Receiving, decoding and encoding those then hold neither
        this process's event loop nor its GIL, and their CPU yields to it.
    upload_port : int
        Port of the upload workers (same host); 0 picks a free one.
    upload_nice : int
        How much lower the upload workers' scheduling priority is (0-19; default 19: they
        get the CPU the main process leaves. On the 2-core VM that cost the heavy searches
        nothing measurable, while at 10 the light queries' p99 was ~15 % higher).
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
    upload_workers: int = 0
    upload_port: int = 0
    upload_nice: int = 19
    draft: DraftConfig = DraftConfig()
    auto_regions: bool = False

    def __post_init__(self) -> None:
        for cfg in (self.index, *self.index_per_collection.values()):
            if not isinstance(cfg, (FaissConfig, MilvusConfig)):
                raise ValueError(f"index must be a FaissConfig or MilvusConfig, got {cfg!r}")
        object.__setattr__(self, "index_per_collection", dict(self.index_per_collection))
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        for name, low, high in (("upload_workers", 0, 64), ("upload_port", 0, 65535),
                                ("upload_nice", 0, 19)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
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

    @property
    def shares_store(self) -> bool:
        """Whether other server processes write this store too (``workers``, the upload
        workers and the process they serve), so the index catches up from the store's
        changelog before each search batch."""
        return self.workers > 1 or self.upload_workers > 0

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
