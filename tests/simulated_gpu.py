"""A simulated GPU for the TensorRT backend: just enough of `tensorrt` and cuda-python's runtime, in
host memory, to run `runtime.backends.tensorrt_backend` under the runner where neither exists.

- Device memory is host memory: cudaMalloc returns the address of a fresh numpy buffer, cudaFree drops
  it, and reading or writing an address that is not a live allocation fails.
- A "plan" is a text file naming an exported ONNX graph; an engine runs it in ONNX Runtime (CPU, one
  thread), reading its inputs from and writing its outputs to the addresses bound on its context.
- The stream runs each operation when it is queued, except under capture: then operations are recorded
  with the addresses bound at that moment, and a launched graph replays the recording, as CUDA graphs do.

What it checks: names, shapes, dtypes, addresses, staging, buffer turns and capture keys, i.e. that the
backend's bindings compute what the ONNX Runtime backend computes. What it cannot check: asynchrony (the
simulated stream is synchronous), TensorRT's own kernels and CUDA's behaviour.
"""

from __future__ import annotations

import ctypes
import sys
import types
from pathlib import Path

import numpy as np

from runtime.backends.onnxruntime_backend import _NUMPY_TYPES


class SimulatedGPU:
    """cuda-python's runtime module (the calls the backend makes), with counters for tests."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h",
                                           cudaMemcpyDeviceToDevice="d2d")
    cudaStreamCaptureMode = types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local")

    def __init__(self):
        self.allocations: dict[int, np.ndarray] = {}
        self.mallocs = 0
        self.recording: list | None = None
        self.counts = {"execute": 0, "graph_launch": 0, "capture": 0}

    # memory
    def cudaMalloc(self, nbytes: int):
        buffer = np.zeros(nbytes, np.uint8)
        self.allocations[buffer.ctypes.data] = buffer
        self.mallocs += 1
        return 0, buffer.ctypes.data

    def cudaFree(self, ptr: int):
        self.allocations.pop(ptr)
        return (0,)

    def device(self, ptr: int, nbytes: int) -> np.ndarray:
        buffer = self.allocations.get(ptr)
        if buffer is None or buffer.nbytes < nbytes:
            raise AssertionError(f"address {ptr:#x} is not a live device allocation of {nbytes} bytes")
        return buffer[:nbytes]

    def cudaMemcpyAsync(self, dst: int, src: int, nbytes: int, kind: str, stream):
        if kind in ("d2h", "d2d"):
            self.device(src, nbytes)
        if kind in ("h2d", "d2d"):
            self.device(dst, nbytes)
        self.enqueue(lambda: ctypes.memmove(dst, src, nbytes))
        return (0,)

    # stream and graphs
    def cudaSetDevice(self, index: int):
        return (0,)

    def cudaStreamCreate(self):
        return 0, "stream"

    def cudaStreamSynchronize(self, stream):
        assert self.recording is None, "synchronize under capture"
        return (0,)

    def enqueue(self, work) -> None:
        if self.recording is not None:
            self.recording.append(work)
        else:
            work()

    def cudaStreamBeginCapture(self, stream, mode):
        assert self.recording is None
        self.recording = []
        return (0,)

    def cudaStreamEndCapture(self, stream):
        recorded, self.recording = self.recording, None
        self.counts["capture"] += 1
        return 0, recorded

    def cudaGraphInstantiate(self, graph, flags):
        return 0, tuple(graph)

    def cudaGraphLaunch(self, graph_exec, stream):
        self.counts["graph_launch"] += 1
        for work in graph_exec:
            work()
        return (0,)

    def cudaGraphDestroy(self, graph):
        return (0,)

    def cudaGraphExecDestroy(self, graph_exec):
        return (0,)


class _Engine:
    """An ONNX graph in ONNX Runtime behind the ICudaEngine calls the backend makes."""

    def __init__(self, session, gpu: SimulatedGPU):
        self.session, self.gpu = session, gpu
        self.tensors = {t.name: ("input", t) for t in session.get_inputs()}
        self.tensors.update({t.name: ("output", t) for t in session.get_outputs()})
        self.names = list(self.tensors)
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 4096

    def get_tensor_name(self, index: int) -> str:
        return self.names[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.tensors[name][0]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.tensors[name][1].shape)

    def get_tensor_dtype(self, name: str) -> np.dtype:
        return np.dtype(_NUMPY_TYPES[self.tensors[name][1].type])

    def create_execution_context(self, strategy: str) -> "_Context":
        assert strategy == "user-managed"
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine):
        self.engine, self.shapes, self.addresses, self.memory = engine, {}, {}, None

    def set_device_memory(self, ptr: int, nbytes: int) -> None:
        self.memory = self.engine.gpu.device(ptr, nbytes)

    def set_input_shape(self, name: str, shape) -> bool:
        declared = self.engine.get_tensor_shape(name)
        assert len(shape) == len(declared) and all(d in (-1, s) for d, s in zip(declared, shape)), (name, shape)
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        """Inputs as set; outputs with their symbolic dims resolved from the inputs' (ONNX dim names)."""
        if name in self.shapes:
            return self.shapes[name]
        sizes = {d: s for t in self.engine.session.get_inputs() for d, s in zip(t.shape, self.shapes[t.name])
                 if isinstance(d, str)}
        return tuple(d if isinstance(d, int) else sizes[d] for d in self.engine.tensors[name][1].shape)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream) -> bool:
        engine, gpu = self.engine, self.engine.gpu
        assert self.memory is not None and set(self.addresses) == set(engine.names), "unbound tensors"
        bound = {name: (self.addresses[name], self.get_tensor_shape(name), engine.get_tensor_dtype(name))
                 for name in engine.names}  # fixed now, as a captured graph fixes them

        def run():
            gpu.counts["execute"] += 1
            feeds = {}
            for name, (ptr, shape, dtype) in bound.items():
                if engine.get_tensor_mode(name) == "input":
                    count = int(np.prod(shape))
                    feeds[name] = gpu.device(ptr, count * dtype.itemsize).view(dtype).reshape(shape).copy()
            for output, value in zip(engine.session.get_outputs(), engine.session.run(None, feeds)):
                ptr, shape, dtype = bound[output.name]
                assert value.shape == shape and value.dtype == dtype, (output.name, value.shape, shape)
                gpu.device(ptr, value.nbytes)[:] = np.ascontiguousarray(value).view(np.uint8).ravel()

        gpu.enqueue(run)
        return True


def install(monkeypatch) -> SimulatedGPU:
    """Make `import tensorrt` and `from cuda.bindings import runtime` give the simulation."""
    import onnxruntime as ort

    gpu = SimulatedGPU()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3

    def deserialize(blob: bytes):
        return _Engine(ort.InferenceSession(blob.decode(), options, providers=["CPUExecutionProvider"]), gpu)

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "simulated"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, blob: deserialize(blob)})
    trt.nptype = np.dtype
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, gpu
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", gpu)):
        monkeypatch.setitem(sys.modules, name, module)
    return gpu


def plans(onnx_files: dict[str, Path], folder: Path) -> dict[str, Path]:
    """A simulated plan per graph: a file naming its ONNX graph."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, path in onnx_files.items():
        out[name] = folder / f"{name}.plan"
        out[name].write_text(str(Path(path).resolve()))
    return out
