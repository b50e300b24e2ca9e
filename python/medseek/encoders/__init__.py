"""One ``Encoder`` interface over two backends: in-process ONNX Runtime and Triton (gRPC).

Both run the same exported ONNX files with the same preprocessing
(:mod:`medseek.encoders.preprocess`), so the same inputs give the same vectors.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Encoder": "base",
    "EncoderSpec": "base",
    "EncoderError": "base",
    "EncoderUnavailable": "base",
    "EncoderInputError": "base",
    "EncoderTimeout": "base",
    "VolumeChunks": "base",
    "OnnxRuntimeEncoder": "onnxrt",
    "TritonEncoder": "triton_client",
    "TritonEncoderConfig": "triton_client",
    "AsyncTritonEncoder": "triton_async",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
