"""Triton gRPC encoder: the repository's models served by ``tritonserver``.

Large inputs are split into requests of at most ``batch_size`` rows, sent concurrently
(``max_in_flight``), so the server's dynamic batcher can merge them with other clients'
requests. Each request has a deadline (``client_timeout``). UNAVAILABLE (server down or
restarting) is retried with exponential backoff; when the retries are spent,
:class:`~medseek.encoders.EncoderUnavailable` is raised. The gRPC channel reconnects by
itself with a short backoff, so the same encoder object keeps working across a server
restart on the same address.

Text goes to ``text_ensemble`` as raw UTF-8 strings: the server tokenises
(``text_tokenizer``, same rules as :func:`medseek.encoders.preprocess.tokenize`).
Images and volumes are checked and prepared here with the same functions the in-process
encoder uses.

:class:`~medseek.encoders.triton_async.AsyncTritonEncoder` is the asyncio variant.
With ``shared_memory_bytes`` set, requests larger than that pass their inputs through a
system shared-memory region registered with the server for the request (client and
server on one host); outputs (small) come back in the gRPC message. The asyncio variant
always sends tensors in the message.

Model names: a repository exported with ``--name-prefix wrist_`` serves
``wrist_image_encoder``, ``wrist_text_ensemble``, ...; ``TritonEncoderConfig(model_prefix=
"wrist_")`` talks to those, so one tritonserver can serve several medseek models (each
export's ``spec.json`` records its prefix: :func:`spec_model_prefix`).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import (EncoderError, EncoderInputError, EncoderSpec, EncoderTimeout,
                   EncoderUnavailable, GraphEncoder)
from .onnxrt import MODEL_NAMES, check_model_prefix
from .preprocess import batches, check_texts

_TRITON_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32",
                  np.dtype(np.int64): "INT64", np.dtype(bool): "BOOL", np.dtype(object): "BYTES"}
# the model clients send raw text to (tokenizer + text_encoder inside the server)
TEXT_MODEL = "text_ensemble"


def spec_model_prefix(spec_path: str | Path) -> str:
    """The ``model_prefix`` an export recorded in its ``spec.json`` ("" when none: exports
    made before prefixes existed served the bare names)."""
    spec_path = Path(spec_path)
    if not spec_path.is_file():
        raise FileNotFoundError(f"spec file not found: {spec_path}")
    raw = json.loads(spec_path.read_text())
    return check_model_prefix(raw.get("model_prefix", ""), f"model_prefix of {spec_path}")


@dataclass(frozen=True)
class TritonEncoderConfig:
    """url : ``host:port`` of Triton's gRPC endpoint
    batch_size : rows per request (<= every model's max_batch_size, 32)
    max_in_flight : concurrent requests of one encode call
    client_timeout : deadline of one request, seconds
    retries : extra attempts after UNAVAILABLE; backoff doubles from ``backoff`` up to
        ``max_backoff`` seconds
    version : model version ("" = the server's choice)
    shared_memory_bytes : requests whose inputs exceed this many bytes pass them through
        system shared memory (client and server on one host; large volumes); None = never
    model_prefix : the repository's name prefix (``medseek export --name-prefix``): the
        models called are ``<model_prefix>image_encoder`` etc.; "" = the bare names"""

    url: str
    batch_size: int = 16
    max_in_flight: int = 4
    client_timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.1
    max_backoff: float = 2.0
    version: str = ""
    shared_memory_bytes: int | None = None
    model_prefix: str = ""

    def __post_init__(self) -> None:
        check_model_prefix(self.model_prefix)
        if self.shared_memory_bytes is not None and self.shared_memory_bytes < 0:
            raise ValueError(f"shared_memory_bytes must be >= 0 or None, got {self.shared_memory_bytes!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 32:
            raise ValueError(f"batch_size must be an int in 1..32, got {self.batch_size!r}")
        if not isinstance(self.max_in_flight, int) or self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {self.max_in_flight!r}")
        if not self.client_timeout > 0:
            raise ValueError(f"client_timeout must be > 0 s, got {self.client_timeout!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if not 0 < self.backoff <= self.max_backoff:
            raise ValueError(
                f"backoff must be in (0, max_backoff={self.max_backoff}], got {self.backoff!r}")

    def model(self, name: str) -> str:
        """The served name of repository model ``name`` (``"image_encoder"``)."""
        return f"{self.model_prefix}{name}"

    def graph_model(self, graph: str) -> str:
        """The served model of exported graph ``graph`` (``"image"``, ``"chunks"``, ...)."""
        return self.model(MODEL_NAMES[graph])


def make_request(grpc_module, inputs: dict, outputs: list[str]):
    """``InferInput``s holding ``inputs`` and the ``InferRequestedOutput``s of ``outputs``
    (``grpc_module``: ``tritonclient.grpc`` or ``tritonclient.grpc.aio``)."""
    tensors = []
    for name, a in inputs.items():
        t = grpc_module.InferInput(name, list(a.shape), _TRITON_DTYPES[a.dtype])
        t.set_data_from_numpy(a)
        tensors.append(t)
    return tensors, [grpc_module.InferRequestedOutput(n) for n in outputs]


def retry_delay_or_raise(exc, cfg: TritonEncoderConfig, model: str, attempt: int,
                         start: float) -> float:
    """Seconds to wait before retrying after ``exc`` (UNAVAILABLE, retries left), else
    raise the encoder error ``exc`` maps to."""
    status = str(exc.status() or "")
    if status.endswith("UNAVAILABLE"):
        if attempt < cfg.retries:
            return min(cfg.max_backoff, cfg.backoff * 2**attempt)
        raise EncoderUnavailable(
            f"Triton at {cfg.url} is unavailable ({model}): {cfg.retries + 1} attempts over "
            f"{time.monotonic() - start:.1f} s; last error: {exc.message()}"
        ) from exc
    if status.endswith("DEADLINE_EXCEEDED"):
        raise EncoderTimeout(f"Triton at {cfg.url} did not answer {model} within "
                             f"client_timeout={cfg.client_timeout} s") from exc
    if status.endswith("INVALID_ARGUMENT"):
        raise EncoderInputError(f"{model} rejected the input: {exc.message()}") from exc
    raise EncoderError(f"{model} failed ({status or 'no status'}): {exc.message()}") from exc


# reconnect quickly after a server restart (gRPC's default reconnect backoff grows to 120 s)
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class TritonEncoder(GraphEncoder):
    """:class:`~medseek.encoders.Encoder` over Triton's gRPC API.

    Parameters
    ----------
    cfg : :class:`TritonEncoderConfig`
    spec : the served model's :class:`~medseek.encoders.EncoderSpec` (``spec.json`` of the
        export, or ``EncoderSpec.from_config_name(name)``): image size and volume chunking
    """

    def __init__(self, cfg: TritonEncoderConfig, spec: EncoderSpec) -> None:
        import tritonclient.grpc as grpcclient

        self.cfg = cfg
        self.spec = spec
        self.batch_size = cfg.batch_size
        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(cfg.url, channel_args=CHANNEL_ARGS)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_in_flight,
                                        thread_name_prefix="triton-encoder")

    # ------------------------------------------------------------------ transport

    def _infer(self, model: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        """One request with retries on UNAVAILABLE; errors mapped to the encoder errors."""
        from tritonclient.utils import InferenceServerException

        limit = self.cfg.shared_memory_bytes
        use_shm = limit is not None and sum(a.nbytes for a in inputs.values()) > limit
        start = time.monotonic()
        for attempt in range(self.cfg.retries + 1):
            try:
                if use_shm:  # registered per attempt: a restarted server has forgotten it
                    return self._infer_shared_memory(model, inputs, outputs)
                tensors, wanted = make_request(self._grpc, inputs, outputs)
                result = self.client.infer(model, tensors, model_version=self.cfg.version,
                                           outputs=wanted, client_timeout=self.cfg.client_timeout)
                return [result.as_numpy(n) for n in outputs]
            except InferenceServerException as exc:
                time.sleep(retry_delay_or_raise(exc, self.cfg, model, attempt, start))
        raise AssertionError("unreachable")

    def _infer_shared_memory(self, model: str, inputs: dict, outputs: list[str]):
        """One request whose inputs travel in a fresh system shared-memory region."""
        import uuid

        import tritonclient.utils.shared_memory as shm
        from tritonclient.utils import InferenceServerException

        arrays = [np.ascontiguousarray(a) for a in inputs.values()]
        size = sum(a.nbytes for a in arrays)
        name = f"medseek-{uuid.uuid4().hex}"
        handle = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
        try:
            shm.set_shared_memory_region(handle, arrays)
            self.client.register_system_shared_memory(name, f"/{name}", size,
                                                      client_timeout=self.cfg.client_timeout)
            try:
                tensors, offset = [], 0
                for (key, a) in zip(inputs, arrays):
                    t = self._grpc.InferInput(key, list(a.shape), _TRITON_DTYPES[a.dtype])
                    t.set_shared_memory(name, a.nbytes, offset)
                    tensors.append(t)
                    offset += a.nbytes
                result = self.client.infer(
                    model, tensors, model_version=self.cfg.version,
                    outputs=[self._grpc.InferRequestedOutput(n) for n in outputs],
                    client_timeout=self.cfg.client_timeout)
                return [result.as_numpy(n) for n in outputs]
            finally:
                try:
                    self.client.unregister_system_shared_memory(name)
                except InferenceServerException:
                    pass  # the server is gone, and the registration with it
        finally:
            shm.destroy_shared_memory_region(handle)

    def run_graph(self, graph: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        return self._infer(self.cfg.graph_model(graph), inputs, outputs)

    def _batched(self, graph: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        """Requests of ``batch_size`` rows, ``max_in_flight`` of them at a time."""
        n = next(iter(inputs.values())).shape[0]
        parts = list(self._pool.map(
            lambda s: self.run_graph(graph, {k: v[s] for k, v in inputs.items()}, outputs),
            batches(n, self.batch_size)))
        return [np.concatenate([p[i] for p in parts]) for i in range(len(outputs))]

    # ------------------------------------------------------------------ text

    def encode_texts(self, texts) -> np.ndarray:
        texts = check_texts(texts)
        raw = np.array([[t.encode("utf-8")] for t in texts], dtype=object)  # (B, 1)
        parts = list(self._pool.map(
            lambda s: self._infer(self.cfg.model(TEXT_MODEL), {"TEXT": raw[s]}, ["embeddings"])[0],
            batches(len(texts), self.batch_size)))
        return np.concatenate(parts)

    # ------------------------------------------------------------------ server

    def ready(self) -> bool:
        """True when the server answers and is ready (False when it cannot be reached)."""
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self.client.is_server_ready(client_timeout=self.cfg.client_timeout))
        except InferenceServerException:
            return False

    def statistics(self, model: str) -> dict:
        """The server's inference statistics of repository model ``model`` (bare name,
        ``"image_encoder"``; the prefix is added), JSON form."""
        return self.client.get_inference_statistics(self.cfg.model(model), as_json=True)

    def metadata(self, model: str) -> dict:
        """The server's metadata (inputs, outputs, shapes) of repository model ``model``
        (bare name; the prefix is added), JSON form."""
        return self.client.get_model_metadata(self.cfg.model(model), as_json=True,
                                              client_timeout=self.cfg.client_timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()

    def __enter__(self) -> "TritonEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
