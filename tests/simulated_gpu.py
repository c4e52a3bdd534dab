"""A simulated GPU: just enough of `tensorrt` (builder and runtime) and cuda-python's runtime, in host
memory, to run export/tensorrt_build.py and `runtime.backends.tensorrt_backend` where neither exists.

- Building records the builder calls (flags, profile shapes, timing cache) and writes a "plan" that
  names the ONNX graph it parsed.
- Device memory is host memory: cudaMalloc returns the address of a fresh numpy buffer, cudaFree drops
  it, and reading or writing an address that is not a live allocation fails.
- An engine runs its plan's ONNX graph in ONNX Runtime (CPU, one thread), reading its inputs from and
  writing its outputs to the addresses bound on its context.
- The stream is asynchronous: queued copies and launches run when the host synchronizes, in order, so
  a host read without a wait gets stale data. A copy from host memory reads the host array when it is
  queued (CUDA stages pageable memory before returning). Under capture, operations are recorded with
  the addresses bound at that moment, and a launched graph queues the recording, as CUDA graphs do.
  `counts["wait"]` counts the synchronizations that found queued launches: the host waiting for compute.

What it checks: our calls, names, shapes, dtypes, addresses, staging, buffer turns, capture keys and
where the host waits, i.e. that the backend's bindings compute what the ONNX Runtime backend computes.
What it cannot check: concurrency beyond one in-order stream, TensorRT's parser, tactics and kernels,
CUDA itself.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
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
        self.queued: list = []
        self.queued_launches = 0
        self.counts = {"execute": 0, "graph_launch": 0, "capture": 0, "wait": 0}
        self.capability = (9, 0)
        self.build_calls: list[tuple] = []

    def cudaGetDeviceProperties(self, index: int):
        return 0, types.SimpleNamespace(major=self.capability[0], minor=self.capability[1])

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
        if kind == "h2d":
            staged = ctypes.create_string_buffer(ctypes.string_at(src, nbytes), nbytes)
            self.enqueue(lambda: ctypes.memmove(dst, staged, nbytes))
        else:
            self.enqueue(lambda: ctypes.memmove(dst, src, nbytes))
        return (0,)

    # stream and graphs
    def cudaSetDevice(self, index: int):
        return (0,)

    cudaStreamNonBlocking = 1

    def cudaStreamCreateWithFlags(self, flags: int):
        assert flags == self.cudaStreamNonBlocking
        return 0, 7  # the stream handle

    def cudaGetLastError(self):
        return (0,)

    def cudaStreamSynchronize(self, stream):
        assert self.recording is None, "synchronize under capture"
        self.counts["wait"] += self.queued_launches > 0
        self.queued_launches = 0
        while self.queued:
            self.queued.pop(0)()
        return (0,)

    def enqueue(self, work) -> None:
        (self.queued if self.recording is None else self.recording).append(work)

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
        self.queued.extend(graph_exec)
        self.queued_launches += 1
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

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int), "TensorRT takes the stream as an integer handle"
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
        gpu.queued_launches += gpu.recording is None
        return True


class _Network:
    onnx_path: str | None = None


class _Parser:
    num_errors = 0

    def __init__(self, network: _Network, logger):
        self.network = network

    def parse_from_file(self, path: str) -> bool:
        self.network.onnx_path = str(Path(path).resolve())
        _GPU.build_calls.append(("parse_from_file", Path(path).name, Path(path + ".data").exists()))
        return True


class _Profile:
    def set_shape(self, name, low, opt, high):
        _GPU.build_calls.append(("set_shape", name, tuple(low), tuple(opt), tuple(high)))


class _TimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+"


class _BuilderConfig:
    def __init__(self):
        self.cache = self.builder_optimization_level = self.progress_monitor = None

    def set_memory_pool_limit(self, pool, size):
        _GPU.build_calls.append(("workspace", size))

    def clear_flag(self, flag):
        _GPU.build_calls.append(("clear_flag", flag))

    def add_optimization_profile(self, profile):
        _GPU.build_calls.append(("add_optimization_profile",))

    def create_timing_cache(self, data):
        return None if bytes(data).startswith(b"corrupt") else _TimingCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags):
        _GPU.build_calls.append(("create_network", flags))
        return _Network()

    def create_builder_config(self):
        return _BuilderConfig()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _BuilderConfig) -> bytes:
        monitor = config.progress_monitor
        monitor.phase_start("Building", None, 2)
        assert monitor.step_complete("Building", 1) is True
        monitor.phase_finish("Building")
        return network.onnx_path.encode()  # the simulated plan: which graph to run


_GPU: SimulatedGPU  # the installed simulation (the builder records into it)


def install(monkeypatch) -> SimulatedGPU:
    """Make `import tensorrt` and `from cuda.bindings import runtime` give the simulation."""
    import onnxruntime as ort

    global _GPU
    gpu = _GPU = SimulatedGPU()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3

    def deserialize(blob: bytes):  # None for what is not a simulated plan, as TensorRT refuses a foreign plan
        path = Path(blob.decode(errors="replace"))
        if not path.is_absolute() or not path.is_file():
            return None
        return _Engine(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), gpu)

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-simulated"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    trt.Logger = type("Logger", (), {"WARNING": 1, "ERROR": 2, "__init__": lambda self, level: None})
    trt.Builder, trt.OnnxParser = _Builder, _Parser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
    trt.IProgressMonitor = type("IProgressMonitor", (), {"__init__": lambda self: None})
    trt.Runtime = type("Runtime", (), {"__init__": lambda self, logger: None,
                                       "deserialize_cuda_engine": lambda self, blob: deserialize(blob)})
    trt.nptype = np.dtype
    trt.DataType = types.SimpleNamespace(BF16="bf16")  # ONNX Runtime on a CPU runs no bf16 graphs: never returned
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, gpu
    for name, module in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", gpu)):
        if isinstance(module, types.ModuleType):
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec works on it
        monkeypatch.setitem(sys.modules, name, module)
    return gpu

