"""Exported ONNX graphs in ONNX Runtime: the CPU EP here; the CUDA EP where onnxruntime-gpu and a GPU are."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.backends.base import Backend, BackendUnavailable


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

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array)

    def download(self, array: np.ndarray) -> np.ndarray:
        return array

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        # Inputs the exporter folded away (e.g. a constant) are not graph inputs: feed only the real ones.
        feeds = {name: value for name, value in inputs.items() if name in self._inputs[graph]}
        results = self.sessions[graph].run(self._outputs[graph], feeds)
        return dict(zip(self._outputs[graph], results))
