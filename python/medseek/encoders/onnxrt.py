"""In-process encoder: ONNX Runtime (CPU) on the exported graphs of a model repository.

It reads the very files Triton serves (``<repo>/<model>/<version>/model.onnx``), so the
in-process and served paths run the same graphs with the same preprocessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .base import EncoderInputError, EncoderSpec, GraphEncoder
from .preprocess import check_texts, load_tokenizer, tokenize

# graph name -> Triton model name in the repository
MODEL_NAMES = {"image": "image_encoder", "image_regions": "image_region_encoder",
               "chunks": "volume_encoder", "pool": "volume_pool", "text": "text_encoder"}

# a Triton model name is a folder name; prefixes keep to characters every tool accepts
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_model_prefix(prefix: str, what: str = "model_prefix") -> str:
    """``prefix`` if it is "" or a valid model-name prefix (``"wrist_"``), else an error
    naming ``what``."""
    if not isinstance(prefix, str):
        raise TypeError(f"{what} must be a str, got {type(prefix).__name__}")
    if prefix and not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"{what} must start with a letter or digit and hold only letters, digits, "
            f"'_', '.', '-' (e.g. 'wrist_'), got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class OnnxRuntimeConfig:
    """intra_op_threads : ONNX Runtime threads per session (0 = one per core)
    allow_spinning : let idle intra-op threads spin (lower latency on dedicated cores;
        on cores shared with other work they burn what the other work needs)
    batch_size : rows per ``session.run``
    version : model version folder to read
    model_prefix : the repository's name prefix (``medseek export --name-prefix``): reads
        ``<model_prefix>image_encoder/<version>/`` etc."""

    intra_op_threads: int = 0
    allow_spinning: bool = False
    batch_size: int = 32
    version: int = 1
    model_prefix: str = ""

    def __post_init__(self) -> None:
        check_model_prefix(self.model_prefix)
        if not isinstance(self.intra_op_threads, int) or self.intra_op_threads < 0:
            raise ValueError(f"intra_op_threads must be an int >= 0, got {self.intra_op_threads!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")


class OnnxRuntimeEncoder(GraphEncoder):
    """:class:`~medseek.encoders.Encoder` running the repository's ONNX files in process.

    Parameters
    ----------
    repo_dir : a model repository filled by :func:`medseek.export.write_repository`
    modality : ``"image"`` or ``"volume"``: which visual encoder to load when the repository
        holds both; None = the one present
    cfg : :class:`OnnxRuntimeConfig`
    """

    def __init__(self, repo_dir: str | Path, modality: str | None = None,
                 cfg: OnnxRuntimeConfig = OnnxRuntimeConfig()) -> None:
        import onnxruntime as ort

        self.repo_dir = Path(repo_dir)
        self.cfg = cfg
        self.batch_size = cfg.batch_size
        present = [m for m, name in (("image", "image_encoder"), ("volume", "volume_encoder"))
                   if self._version_dir(name).is_dir()]
        if modality is None:
            if len(present) != 1:
                raise ValueError(
                    f"modality must be given when {self.repo_dir} holds {present or 'no'} visual "
                    "encoders; pass 'image' or 'volume'"
                )
            modality = present[0]
        if modality not in present:
            raise ValueError(f"modality {modality!r} has no exported model in {self.repo_dir}")
        visual = "image_encoder" if modality == "image" else "volume_encoder"
        self.spec = EncoderSpec.load(self._version_dir(visual) / "spec.json")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.intra_op_threads
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if cfg.allow_spinning else "0")
        graphs = ("image",) if modality == "image" else ("chunks", "pool")
        if self.spec.region_head:  # the spec of a region-head model: its region graph too
            graphs += ("image_regions",)
        if self.spec.has_text:
            graphs += ("text",)
        self.sessions = {}
        for graph in graphs:
            path = self._version_dir(MODEL_NAMES[graph]) / "model.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} missing; run `medseek export` into {self.repo_dir}")
            self.sessions[graph] = ort.InferenceSession(str(path), opts,
                                                        providers=["CPUExecutionProvider"])
        self.tokenizer = None
        if self.spec.has_text:
            tok = self._version_dir("text_tokenizer") / "tokenizer.json"
            if not tok.is_file():
                raise FileNotFoundError(f"{tok} missing; run `medseek export` into {self.repo_dir}")
            self.tokenizer = load_tokenizer(tok, self.spec.max_length, self.spec.tokenizer)

    def _version_dir(self, model: str) -> Path:
        return self.repo_dir / f"{self.cfg.model_prefix}{model}" / str(self.cfg.version)

    def run_graph(self, graph: str, inputs: dict, outputs: list[str]) -> list[np.ndarray]:
        if graph not in self.sessions:
            raise EncoderInputError(f"this encoder's model has no {graph!r} graph "
                                    f"(it encodes {self.spec.modality}s)")
        return self.sessions[graph].run(outputs, inputs)

    def encode_texts(self, texts) -> np.ndarray:
        if self.tokenizer is None:
            raise EncoderInputError(f"this encoder's model ({self.spec.name or 'image-only'}) "
                                    "has no text tower; it embeds images only")
        texts = check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for s in range(0, len(texts), self.batch_size):
            ids, mask = tokenize(self.tokenizer, texts[s:s + self.batch_size])
            out[s:s + len(ids)] = self.run_graph(
                "text", {"input_ids": ids, "attention_mask": mask}, ["embeddings"])[0]
        return out
