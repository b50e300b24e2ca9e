"""Triton python-backend model: ONNX Runtime (CPU) on ``<version>/model.onnx``.

``medseek export`` copies this file as ``model.py`` into the version folder of
image_encoder, volume_encoder, volume_pool and text_encoder. Inputs and outputs are the
ones the model's config.pbtxt declares; it needs only numpy and onnxruntime.

Backend contract (python_backend's add_sub example):
* the config is parsed and the session built once, in ``initialize``;
* ``execute`` returns exactly one response per request, in order;
* a bad request gets an error response (INVALID_ARG) naming the input and the expected
  shape; nothing is raised out of ``execute``, and other requests in the batch are served.

Dynamic batching: the requests that Triton's batcher hands over together and whose
non-batch shapes agree are concatenated into one ``session.run``; the outputs are split
back per request.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _error(message):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):  # older stubs: message only
        return pb_utils.TritonError(message)


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.name = cfg["name"]
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"]))
                       for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        opts.log_severity_level = 3
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      params.get("allow_spinning", "0"))
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        # per input: the ONNX shape, ints for fixed dims and names for dynamic ones
        self.shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        missing = [n for n, _ in self.inputs if n not in self.shapes]
        if missing:
            raise ValueError(f"{self.name}: config inputs {missing} are not inputs of {path}; "
                             f"the graph has {sorted(self.shapes)}")

    def _read(self, request):
        """The request's input arrays, or an error message."""
        arrays, named = {}, {}
        for name, dtype in self.inputs:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is None:
                return None, f"{self.name}: input {name!r} is missing"
            a = t.as_numpy()
            if a.dtype != dtype:
                return None, f"{self.name}: input {name!r} must be {np.dtype(dtype)}, got {a.dtype}"
            want = self.shapes[name]
            if a.ndim != len(want):
                return None, f"{self.name}: input {name!r} must have {len(want)} dims {want}, got shape {a.shape}"
            for axis, (got, dim) in enumerate(zip(a.shape, want)):
                if isinstance(dim, int) and got != dim:
                    return None, (f"{self.name}: input {name!r} must have shape {want}, "
                                  f"got {list(a.shape)} (dim {axis} must be {dim})")
                if isinstance(dim, str):  # a named dynamic dim must agree across inputs
                    first = named.setdefault(dim, (got, name))
                    if first[0] != got:
                        return None, (f"{self.name}: dim {dim!r} of input {name!r} is {got} but "
                                      f"{first[0]} in input {first[1]!r}")
            arrays[name] = a
        return arrays, None

    def _run(self, arrays):
        return self.session.run(self.outputs, arrays)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # non-batch shapes -> [(request index, arrays)]
        for i, request in enumerate(requests):
            arrays, err = self._read(request)
            if err is not None:
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=_error(err))
                continue
            key = tuple(arrays[n].shape[1:] for n, _ in self.inputs)
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            try:
                cat = {n: np.concatenate([a[n] for _, a in members]) for n, _ in self.inputs}
                outs = self._run(cat)
            except Exception:  # noqa: BLE001 - isolate the failing request below
                outs = None
            start = 0
            for i, arrays in members:
                n = arrays[self.inputs[0][0]].shape[0]
                if outs is not None:
                    mine = [o[start:start + n] for o in outs]
                else:
                    try:
                        mine = self._run(arrays)
                    except Exception as exc:  # noqa: BLE001 - one response per request
                        responses[i] = pb_utils.InferenceResponse(
                            output_tensors=[], error=_error(f"{self.name}: {exc}"))
                        continue
                start += n
                responses[i] = pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor(name, np.ascontiguousarray(o)) for name, o in zip(self.outputs, mine)
                ])
        return responses

    def finalize(self):
        self.session = None
