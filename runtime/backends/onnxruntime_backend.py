"""Exported ONNX graphs in ONNX Runtime: the CPU EP here; the CUDA EP where onnxruntime-gpu and a GPU are.

Graphs run through IO binding: outputs of static shape are written into `OutputBuffers` allocated
once per runner (host memory, numpy arrays shared with ONNX Runtime); outputs with a dynamic dim (the
text batch, the VAE window) are allocated by ONNX Runtime per call.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.backends.base import Backend, BackendUnavailable, OutputBuffers

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
                "tensor(int64)": np.int64, "tensor(bool)": np.bool_}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, models: Mapping[str, Path], device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnxruntime backend needs the onnxruntime package "
                                     "(pip install -e '.[onnxruntime]')") from None
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("ONNX Runtime has no CUDA execution provider here "
                                         "(install the onnxruntime-gpu extra on a GPU machine)")
            providers = [("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)})]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("NOVA_ORT_THREADS", "0"))
        options.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(path), options, providers=providers)
                         for name, path in models.items()}
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in self.sessions.items()}
        self._static = {name: {o.name: (tuple(o.shape), _NUMPY_TYPES[o.type]) for o in s.get_outputs()
                               if all(isinstance(d, int) for d in o.shape) and o.type in _NUMPY_TYPES}
                        for name, s in self.sessions.items()}
        self.buffers = OutputBuffers(lambda shape, dtype: _shared(ort, np.empty(shape, dtype)))
        self._bindings: dict[int, Any] = {}  # id(buffer set) -> its IO binding

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def download(self, array: np.ndarray) -> np.ndarray:
        return array.copy()  # the buffer is written again two calls later

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        session, static = self.sessions[graph], self._static[graph]
        buffers = self.buffers.next(graph, static) if static else {}
        binding = self._bindings.get(id(buffers)) if buffers else None
        if binding is None:  # outputs are bound once per buffer set (measured: cheaper than Session.run per call)
            binding = session.io_binding()
            for name in self._outputs[graph]:
                if name in buffers:
                    binding.bind_ortvalue_output(name, buffers[name][1])
                else:
                    binding.bind_output(name, "cpu")
            if buffers:
                self._bindings[id(buffers)] = binding
        for name, value in inputs.items():
            if name in self._inputs[graph]:  # inputs the exporter folded away (e.g. a constant) are not fed
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        session.run_with_iobinding(binding)
        if len(buffers) == len(self._outputs[graph]):
            return {name: array for name, (array, _) in buffers.items()}
        return {name: buffers[name][0] if name in buffers else value.numpy()
                for name, value in zip(self._outputs[graph], binding.get_outputs())}


def _shared(ort, array: np.ndarray) -> tuple[np.ndarray, Any]:
    """A host array and the OrtValue over its memory (ONNX Runtime writes the array in place)."""
    return array, ort.OrtValue.ortvalue_from_numpy(array)
