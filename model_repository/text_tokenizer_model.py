"""Triton python-backend model: report text (UTF-8 bytes) -> token ids and mask.

``medseek export`` copies this file as ``text_tokenizer/<version>/model.py`` next to
``tokenizer.json`` and ``spec.json``. The rules match
``medseek.encoders.preprocess.load_tokenizer`` / ``tokenize`` (the in-process path):
truncate at ``max_length`` tokens ([CLS] and [SEP] included), pad with id 0 to the
longest text of the request (or with the pad token and to the length that spec.json's
``tokenizer`` names: a Hugging Face CLIP/SigLIP checkpoint's own rules). Config parsed
once; one response per request; a text that is not UTF-8 gets an error response, never
an exception out of ``execute``.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _error(message):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):
        return pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args):
        folder = Path(args["model_repository"]) / args["model_version"]
        spec = json.loads((folder / "spec.json").read_text())
        self.max_length = int(spec["max_length"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        # spec "tokenizer": a checkpoint's own padding (medseek.export.hf), else MiniLM's
        pad = spec.get("tokenizer") or {}
        self.tokenizer.enable_padding(
            pad_id=int(pad.get("pad_id", 0)), pad_token=str(pad.get("pad_token", "[PAD]")),
            length=self.max_length if pad.get("to_max_length") else None)

    def execute(self, requests):
        responses = []
        for request in requests:
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()  # (B, 1) object
            try:
                texts = [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                         for v in raw.reshape(-1)]
            except UnicodeDecodeError as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=_error(f"text_tokenizer: TEXT is not UTF-8: {exc}")))
                continue
            encs = self.tokenizer.encode_batch(texts)
            ids = np.asarray([e.ids for e in encs], dtype=np.int64)
            mask = np.asarray([e.attention_mask for e in encs], dtype=np.int64)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("input_ids", ids), pb_utils.Tensor("attention_mask", mask)]))
        return responses
