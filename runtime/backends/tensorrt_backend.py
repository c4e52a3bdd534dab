"""TensorRT plans over CUDA buffers (TensorRT 10.x / 11.x API, cuda-python 13 bindings).

Needs `tensorrt` and `cuda-python` on a machine with an NVIDIA GPU; neither torch nor onnxruntime.
Device arrays are `DeviceArray`s (a CUDA allocation with shape and dtype); every graph runs through
`execute_async_v3` on one stream, with input and output addresses bound by tensor name, and nothing
waits for the device between launches (downloads do). Memory:
- outputs go into `OutputBuffers` (allocated once, used in turn);
- all execution contexts share one activation buffer (user-managed device memory, sized for the
  largest engine);
- uploads reuse freed memory of their size (`DeviceMemory`), so steady-state steps call neither
  cudaMalloc nor cudaFree. Reuse is safe without waiting because every copy and launch is on the one
  stream: work that writes reused memory is queued after the launches that read it.

CUDA graphs: an engine with static shapes (every graph but the text encoder and the spatial graph)
reads its inputs from fixed staging buffers (`InputStaging`) or straight from other graphs' output
buffers, so a launch binds one of a few fixed address sets. Each set is captured once into a CUDA
graph and replayed from then on (`CudaGraphs`): the 25 denoise launches of a mask step cost one graph
launch each plus the copies of the inputs that changed (the step's sampler row, its noise).

Status: written against the documented API; NOT executed anywhere yet (TensorRT cannot be installed
on the machines this project was developed on). Its tests skip with that reason. Its logic (bindings,
staging, buffer turns, capture and replay, allocation) runs in CI on a simulated GPU
(tests/simulated_gpu.py), which cannot show asynchrony problems or TensorRT's own behaviour.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from runtime.backends.base import Backend, BackendUnavailable, OutputBuffers

log = logging.getLogger(__name__)


def _import():
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as error:
        raise BackendUnavailable(f"the tensorrt backend needs the tensorrt and cuda-python packages ({error})") from None
    return trt, cudart


def _check(result):
    """cuda-python calls return (error, *values)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


class DeviceMemory:
    """cudaMalloc with a free list by size: an array's memory goes back to the list when the array is
    garbage, and the next array of that size takes it. Per-call uploads (each diffusion step's noise)
    then cost no cudaMalloc / cudaFree (which synchronizes the device) after the first request.
    Buffers that live as long as the backend (outputs, staging, activations) are allocated fresh, so
    they never take memory that a later request's uploads would reuse."""

    def __init__(self, cudart):
        self.cudart, self.free = cudart, {}

    def take(self, nbytes: int, reuse: bool = True) -> int:
        spare = self.free.get(nbytes) if reuse else None
        return spare.pop() if spare else _check(self.cudart.cudaMalloc(max(nbytes, 1)))

    def give(self, ptr: int, nbytes: int) -> None:
        self.free.setdefault(nbytes, []).append(ptr)

    def __del__(self):
        for pointers in self.free.values():
            for ptr in pointers:
                self.cudart.cudaFree(ptr)


_serials = itertools.count(1)


class DeviceArray:
    """A CUDA allocation holding one array. `graph_output`: an output buffer, rewritten by its graph
    and bound in place; an upload is written once, so its serial number identifies its content.
    `permanent`: lives as long as the backend (outputs, staging, activations)."""

    def __init__(self, memory: DeviceMemory, shape: tuple[int, ...], dtype: np.dtype, graph_output: bool = False,
                 permanent: bool = False):
        self.memory, self.shape, self.dtype = memory, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = memory.take(self.nbytes, reuse=not (permanent or graph_output))
        self.graph_output, self.serial = graph_output, next(_serials)

    def __del__(self):
        if getattr(self, "ptr", None):
            self.memory.give(self.ptr, self.nbytes)


class InputStaging:
    """Fixed input buffers of one static-shape graph, so that its launches bind fixed addresses. Output
    buffers of other graphs are bound as they are (their addresses are fixed too); anything else is
    copied into the input's staging buffer, unless that buffer already holds it (same serial: an
    uploaded array's content never changes, so a per-request constant is copied once)."""

    def __init__(self, memory: DeviceMemory, copy: Callable[[DeviceArray, "DeviceArray | np.ndarray"], None]):
        self.memory, self.copy = memory, copy
        self.buffers: dict[str, DeviceArray] = {}
        self.holds: dict[str, int] = {}

    def bind(self, name: str, value: "DeviceArray | np.ndarray") -> DeviceArray:
        if isinstance(value, DeviceArray) and value.graph_output:
            return value
        if not isinstance(value, DeviceArray):
            value = np.ascontiguousarray(value)
        buffer = self.buffers.get(name)
        if buffer is None:
            buffer = self.buffers[name] = DeviceArray(self.memory, value.shape, value.dtype, permanent=True)
        if (buffer.shape, buffer.dtype) != (tuple(value.shape), np.dtype(value.dtype)):
            raise ValueError(f"input {name}: {value.dtype}{list(value.shape)} where the engine takes "
                             f"{buffer.dtype}{list(buffer.shape)}")
        serial = value.serial if isinstance(value, DeviceArray) else None  # host arrays: always copied
        if serial is None or self.holds.get(name) != serial:
            self.copy(buffer, value)
            self.holds[name] = serial
        return buffer


class CudaGraphs:
    """Launches replayed as CUDA graphs, one per (graph, bound addresses). The first launch of a key
    runs eagerly (its result, and the enqueue TensorRT needs after binding before a capture), then is
    captured; later launches of the key replay the capture. A graph whose capture fails runs eagerly
    from then on, with a warning."""

    def __init__(self, cudart, stream):
        self.cudart, self.stream = cudart, stream
        self.execs: dict[tuple, Any] = {}
        self.eager: set[str] = set()

    def launch(self, graph: str, addresses: tuple[int, ...], enqueue: Callable[[], None]) -> None:
        captured = self.execs.get((graph, addresses))
        if captured is not None:
            _check(self.cudart.cudaGraphLaunch(captured, self.stream))
            return
        enqueue()
        if graph not in self.eager:
            captured = self._capture(graph, enqueue)
            if captured is not None:
                self.execs[(graph, addresses)] = captured

    def _capture(self, graph: str, enqueue: Callable[[], None]):
        cudart = self.cudart
        _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        failure = None
        try:
            enqueue()  # recorded, not executed
        except RuntimeError as error:
            failure = error
        error, recorded = cudart.cudaStreamEndCapture(self.stream)  # ends the capture whatever happened
        if failure is None and int(error) != 0:
            failure = f"CUDA error {error}"
        if failure is None:
            error, captured = cudart.cudaGraphInstantiate(recorded, 0)
            cudart.cudaGraphDestroy(recorded)
            if int(error) == 0:
                return captured
            failure = f"CUDA error {error}"
        log.warning("%s: CUDA graph capture failed (%s); it runs without CUDA graphs", graph, failure)
        self.eager.add(graph)
        return None

    def __del__(self):
        for captured in self.execs.values():
            self.cudart.cudaGraphExecDestroy(captured)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, plans: Mapping[str, Path], device: str = "cuda"):
        trt, cudart = _import()
        if not device.startswith("cuda"):
            raise BackendUnavailable("the tensorrt backend runs on a CUDA device (device='cuda')")
        _check(cudart.cudaSetDevice(int(device.partition(":")[2] or 0)))
        self.trt, self.cudart = trt, cudart
        self.stream = _check(cudart.cudaStreamCreate())
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines, self.contexts = {}, {}
        for name, path in plans.items():
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if engine is None:
                raise BackendUnavailable(f"{Path(path).name} does not load with TensorRT {trt.__version__} on this GPU; "
                                         f"rebuild it with export/build_engines.py --backend tensorrt")
            self.engines[name] = engine
            self.contexts[name] = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.io = {name: [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
                   for name, engine in self.engines.items()}
        self.inputs = {name: [n for n in names if self.engines[name].get_tensor_mode(n) == trt.TensorIOMode.INPUT]
                       for name, names in self.io.items()}
        # Graphs run one at a time on one stream, so all contexts share one activation (scratch) buffer,
        # sized for the largest engine, instead of holding one each. A fixed address is also what lets
        # captured CUDA graphs replay.
        self.memory = DeviceMemory(cudart)
        self.activations = DeviceArray(self.memory, (max(e.device_memory_size_v2 for e in self.engines.values()),),
                                       np.uint8, permanent=True)
        for context in self.contexts.values():
            context.set_device_memory(self.activations.ptr, self.activations.nbytes)
        self.buffers = OutputBuffers(lambda shape, dtype: DeviceArray(self.memory, shape, dtype, graph_output=True))
        self.staging = {name: InputStaging(self.memory, self._copy) for name, engine in self.engines.items()
                        if all(-1 not in tuple(engine.get_tensor_shape(n)) for n in self.inputs[name])}
        self.cuda_graphs = CudaGraphs(cudart, self.stream)

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.engines)

    def _copy(self, target: DeviceArray, source: "DeviceArray | np.ndarray") -> None:
        """Queue a copy into `target`: device to device, or from a host array (then waited for, as the
        host array may go away after return)."""
        kinds = self.cudart.cudaMemcpyKind
        if isinstance(source, DeviceArray):
            _check(self.cudart.cudaMemcpyAsync(target.ptr, source.ptr, target.nbytes, kinds.cudaMemcpyDeviceToDevice,
                                               self.stream))
            return
        _check(self.cudart.cudaMemcpyAsync(target.ptr, source.ctypes.data, target.nbytes, kinds.cudaMemcpyHostToDevice,
                                           self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))

    def upload(self, array: np.ndarray) -> DeviceArray:
        host = np.ascontiguousarray(array)
        device = DeviceArray(self.memory, host.shape, host.dtype)
        self._copy(device, host)
        return device

    def download(self, array: DeviceArray) -> np.ndarray:
        host = np.empty(array.shape, array.dtype)
        _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, array.ptr, array.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return host

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, DeviceArray]:
        trt, engine, context = self.trt, self.engines[graph], self.contexts[graph]
        staging = self.staging.get(graph)
        bound = {}
        for name in self.inputs[graph]:
            value = inputs[name]
            if staging is not None:
                bound[name] = staging.bind(name, value)
            else:  # dynamic shapes: bound where they are (an upload is released after its launch, in stream order)
                bound[name] = value if isinstance(value, DeviceArray) else self.upload(np.asarray(value))
            context.set_input_shape(name, bound[name].shape)
        shapes = {name: (tuple(context.get_tensor_shape(name)), np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
                  for name in self.io[graph] if name not in bound}
        outputs = dict(self.buffers.next(graph, shapes))  # allocated on first use, then reused in turn
        for name, array in {**bound, **outputs}.items():
            context.set_tensor_address(name, array.ptr)

        def enqueue() -> None:
            if not context.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT failed to run {graph}")

        if staging is None:
            enqueue()
        else:
            self.cuda_graphs.launch(graph, tuple(a.ptr for a in {**bound, **outputs}.values()), enqueue)
        return outputs

    def synchronize(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self.stream))
