"""How the server does its work: what one request may cost (``RequestBudget``, the readers'
``SERVE_LIMITS``), how requests are micro-batched (``BatchConfig``), the encode lanes
(``EncodeLane``, ``EncodeLanes``) and how uploads become encoder input
(``PreprocessSpec``). Parts of :class:`medseek.serve.config.ServeConfig`, which re-exports
them."""

from __future__ import annotations

from dataclasses import dataclass

from medseek.io import ReadLimits

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
    uploads : int
        ``SearchUpload`` streams of this lane whose chunks are read at once. Each chunk is
        copied on the event loop, so 32 uploads read together put 32 copies between a
        light request's steps; more wait, held by gRPC's flow control, not buffered.
    nice : int
        Scheduling niceness (0-19, Linux) added to the process's for the lane's decode
        and encoder threads: a heavy lane at 10 gives way on busy cores to the light
        lane's threads and the event loop. Threads an encoder library starts from them
        (intra-op pools) inherit it.
    cpus : tuple of int, optional
        CPUs the lane's decode and encoder threads may run on (Linux CPU affinity; threads
        they start inherit it). Priority alone still lets heavy threads take every core
        between two steps of a light request; pinning the heavy lanes to some cores keeps
        the others free for the event loop and the light lane. CPUs this process may not
        use are dropped; none left: the lane keeps the process's CPUs. None: any.
    """

    workers: int = 1
    decode_threads: int = 1
    max_queue: int | None = None
    max_queued_bytes: int | None = None
    uploads: int = 2
    nice: int = 0
    cpus: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.cpus is not None:
            cpus = tuple(self.cpus)
            if not cpus or not all(isinstance(c, int) and c >= 0 for c in cpus):
                raise ValueError(f"cpus must be a non-empty list of CPU numbers >= 0 or None, "
                                 f"got {self.cpus!r}")
            object.__setattr__(self, "cpus", cpus)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {self.decode_threads!r}")
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 or None, got {self.max_queue!r}")
        if self.max_queued_bytes is not None and self.max_queued_bytes < 1:
            raise ValueError(f"max_queued_bytes must be >= 1 or None, got "
                             f"{self.max_queued_bytes!r}")
        if self.uploads < 1:
            raise ValueError(f"uploads must be >= 1, got {self.uploads!r}")
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
        Radiographs are scaled to [0, 1] as the training data was
        (:func:`medseek.io.unit_intensity`: 8-bit by 255, deeper ones by their own min
        and max) and resized to (H, W).
    target_spacing : float or (float, float, float)
        Volumes are resampled to this spacing (mm; one number: isotropic; three: z, y, x) ...
    window : (float, float)
        ... and windowed with (center, width) into [0, 1]; H and W are then zero-padded
        (bottom, right) to multiples of ``volume_multiple`` (the volume model's patch
        (py, px)), as in training.
    blend_window : (float, float), optional
        A second window averaged with ``window`` (``medseek.volume.blend``), for a model
        trained so (``PreprocessConfig.blend_window``).

    The server replaces ``image_size``, ``volume_multiple``, and for a volume model whose
    spec records them ``target_spacing``, ``window`` and ``blend_window``, by what its
    encoder declares (``medseek.serve.routed.input_geometry``): a model is served with the
    preprocessing it was trained and measured with.
    """

    image_size: tuple[int, int] = (64, 64)
    target_spacing: float | tuple[float, float, float] = 4.0
    window: tuple[float, float] = (40.0, 400.0)
    volume_multiple: tuple[int, int] = (1, 1)
    blend_window: tuple[float, float] | None = None

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
        names = ("window",) if self.blend_window is None else ("window", "blend_window")
        for name in names:
            window = tuple(float(v) for v in getattr(self, name))
            if len(window) != 2 or not window[1] > 0:
                raise ValueError(f"{name} must be (center, width > 0), "
                                 f"got {getattr(self, name)!r}")
            object.__setattr__(self, name, window)
        multiple = tuple(int(v) for v in self.volume_multiple)
        if len(multiple) != 2 or min(multiple) < 1:
            raise ValueError(f"volume_multiple must be two ints >= 1, got {self.volume_multiple!r}")
        object.__setattr__(self, "volume_multiple", multiple)
