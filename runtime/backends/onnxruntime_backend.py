"""Exported ONNX graphs in ONNX Runtime: the CPU EP here; the CUDA EP where onnxruntime-gpu and a GPU are.

Device arrays are `OrtValue`s on the session's device (host memory for the CPU EP, GPU memory for the
CUDA EP), and every graph runs through IO binding, so outputs fed to the next graph never pass through
the host on a GPU. The CPU and CUDA paths are the same code (only the device name differs), so CI runs
it. Outputs of static shape are written into `OutputBuffers` allocated once per runner, with one IO
binding per buffer set (measured on the CPU: as fast as `Session.run`, which allocates per call);
outputs with a dynamic dim (the text batch, the VAE window) are allocated by ONNX Runtime per call.
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

    def __init__(self, models: Mapping[str, Path], device: str = "cpu", threads: int | None = None, tf32: bool = False):
        """tf32: let the CUDA provider run fp32 matrix work in TF32 (off for fp32 builds, as their parity
        is measured at fp32; the TensorRT build makes the same choice)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("the onnxruntime backend needs the onnxruntime package "
                                     "(pip install -e '.[onnxruntime]')") from None
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("ONNX Runtime has no CUDA execution provider here "
                                         "(install the onnxruntime-gpu extra on a GPU machine)")
            self.device = ("cuda", int(device.partition(":")[2] or 0))
            providers = [("CUDAExecutionProvider", {"device_id": self.device[1], "use_tf32": str(int(tf32))})]
        else:
            self.device = ("cpu", 0)
            providers = ["CPUExecutionProvider"]
        self.ort = ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or int(os.environ.get("NOVA_ORT_THREADS", "0"))
        options.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(path), options, providers=providers)
                         for name, path in models.items()}
        # ONNX Runtime falls back to the CPU when the CUDA provider fails to load, with a warning only.
        off_gpu = [name for name, session in self.sessions.items() if session.get_providers()[0] != "CUDAExecutionProvider"]
        if self.device[0] == "cuda" and off_gpu:
            raise BackendUnavailable(f"ONNX Runtime could not start its CUDA provider for {', '.join(off_gpu)} "
                                     f"(CUDA or cuDNN libraries missing or mismatched?)")
        self._outputs = {name: [o.name for o in s.get_outputs()] for name, s in self.sessions.items()}
        self._inputs = {name: {i.name for i in s.get_inputs()} for name, s in self.sessions.items()}
        self._static = {name: {o.name: (tuple(o.shape), _NUMPY_TYPES[o.type]) for o in s.get_outputs()
                               if all(isinstance(d, int) for d in o.shape) and o.type in _NUMPY_TYPES}
                        for name, s in self.sessions.items()}
        self.buffers = OutputBuffers(lambda shape, dtype: ort.OrtValue.ortvalue_from_shape_and_type(
            list(shape), dtype, *self.device))
        self._bindings: dict[int, Any] = {}  # id(buffer set) -> its IO binding

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.sessions)

    def upload(self, array: np.ndarray):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), *self.device)

    def download(self, array) -> np.ndarray:
        return np.array(array.numpy())  # a copy: the buffer is written again two calls later

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        session, static = self.sessions[graph], self._static[graph]
        buffers = self.buffers.next(graph, static) if static else {}
        binding = self._bindings.get(id(buffers)) if buffers else None
        if binding is None:  # outputs are bound once per buffer set
            binding = session.io_binding()
            for name in self._outputs[graph]:
                if name in buffers:
                    binding.bind_ortvalue_output(name, buffers[name])
                else:
                    binding.bind_output(name, self.device[0], self.device[1])
            if buffers:
                self._bindings[id(buffers)] = binding
        for name, value in inputs.items():
            if name in self._inputs[graph]:  # inputs the exporter folded away (e.g. a constant) are not fed
                binding.bind_ortvalue_input(name, value if isinstance(value, self.ort.OrtValue) else self.upload(value))
        session.run_with_iobinding(binding)
        if len(buffers) == len(self._outputs[graph]):
            return dict(buffers)
        return dict(zip(self._outputs[graph], binding.get_outputs()))

    def synchronize(self) -> None:
        pass  # run_with_iobinding returns when the outputs are written
