"""TensorRT plans over CUDA buffers (TensorRT >= 10.8 or 11.x, cuda-python 13: the `tensorrt` extra).

Needs `tensorrt` and `cuda-python` on a machine with an NVIDIA GPU; neither torch nor onnxruntime.
Device arrays are `DeviceArray`s (a CUDA allocation with shape and dtype); every graph runs through
`execute_async_v3` on one stream, with input and output addresses bound by tensor name; the host
waits for the device only around host memory (uploads, downloads). Memory:
- outputs go into `OutputBuffers` (allocated once, used in turn);
- all execution contexts share one activation buffer (user-managed device memory, sized for the
  largest engine);
- uploads reuse freed memory of their size (`DeviceMemory`), so steady-state steps call neither
  cudaMalloc nor cudaFree. Reuse is safe without waiting because every copy and launch is on the one
  stream: work that writes reused memory is queued after the launches that read it.

CUDA graphs: an engine whose inputs have static shapes (in the default builds: temporal prefill and
step, denoise_loop, denoise, place, the image VAE; not the text encoder, the spatial graph or the
video VAE) reads its inputs from fixed staging buffers (`InputStaging`) or straight from other graphs'
output buffers, so a launch binds one of a few fixed address sets. Each set is captured once into a
CUDA graph, on an execution context of its own (TensorRT's advice; contexts share the activation
buffer), and replayed from then on (`CudaGraphs`): a mask step's denoise_loop costs one graph launch
plus the copies of the inputs that changed (its initial noise, and the step noise where the sampler
adds some); the fallback's denoise launches, one per diffusion step, each copy their sampler row. Inputs
are checked against the engine's dtypes and shapes before anything is bound; bf16 activations are
stored as 16-bit patterns (numpy has no bfloat16) and never leave the device.

Status: written against the documented API; NOT executed anywhere yet (TensorRT cannot be installed
on the machines this project was developed on). Its tests skip with that reason. Its logic (bindings,
staging, buffer turns, capture and replay, allocation, where the host waits) runs in CI on a simulated
GPU (tests/simulated_gpu.py: an asynchronous in-order stream), which cannot show TensorRT's own behaviour.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from runtime.backends import cuda_graphs
from runtime.backends.base import Backend, BackendUnavailable, OutputBuffers
from runtime.backends.cuda_graphs import Captures, cuda_check, native_handle


def _import():
    try:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart
    except ImportError as error:
        raise BackendUnavailable(f"the tensorrt backend needs the tensorrt and cuda-python packages ({error})") from None
    return trt, cudart


_check = cuda_check


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


class DeviceArray:
    """A CUDA allocation holding one array. `graph_output`: an output buffer, rewritten by its graph
    and bound in place; an upload is written once, so its serial number identifies its content.
    `permanent`: lives as long as the backend (outputs, staging, activations)."""

    def __init__(self, memory: DeviceMemory, shape: tuple[int, ...], dtype: np.dtype, graph_output: bool = False,
                 permanent: bool = False):
        self.memory, self.shape, self.dtype = memory, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = memory.take(self.nbytes, reuse=not (permanent or graph_output))
        self.graph_output = graph_output
        cuda_graphs.new_content(self)

    def __del__(self):
        if getattr(self, "ptr", None):
            self.memory.give(self.ptr, self.nbytes)


class InputStaging(cuda_graphs.InputStaging):
    """`cuda_graphs.InputStaging` over `DeviceArray`s: staging buffers live as long as the backend."""

    def __init__(self, memory: DeviceMemory, copy: Callable[[DeviceArray, "DeviceArray | np.ndarray"], None]):
        super().__init__(lambda value: DeviceArray(memory, value.shape, value.dtype, permanent=True), copy)


class CudaGraphs(Captures):
    """`Captures` of engine launches with cuda-python: stream capture around the enqueue, one executable
    graph per key (TensorRT needs an enqueue before a capture: `record`'s eager run)."""

    def __init__(self, cudart, stream):
        super().__init__()
        self.cudart, self.stream = cudart, stream

    def _launch(self, captured) -> None:
        _check(self.cudart.cudaGraphLaunch(captured, self.stream))

    def _capture(self, graph: str, enqueue: Callable[[], None]):
        cudart = self.cudart
        _check(cudart.cudaStreamBeginCapture(self.stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))
        failure = None
        try:
            enqueue()  # recorded, not executed
        except RuntimeError as error:
            failure = error
        ended, recorded = cudart.cudaStreamEndCapture(self.stream)  # ends the capture whatever happened
        captured = None
        if int(ended) != 0:
            failure = failure or f"CUDA error {ended}"
        else:
            if failure is None:
                instantiated, captured = cudart.cudaGraphInstantiate(recorded, 0)
                if int(instantiated) != 0:
                    failure, captured = f"CUDA error {instantiated}", None
            cudart.cudaGraphDestroy(recorded)  # the executable graph (if any) is independent of it
        if failure is None:
            return captured
        cudart.cudaGetLastError()  # clear the failed capture's error before the next launch
        self._failed(graph, failure)
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
        self.trt, self.cudart, self.device = trt, cudart, int(device.partition(":")[2] or 0)
        self._select_device()
        # Non-blocking: work that another library queues on the legacy default stream must not join a capture.
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.stream_handle = native_handle(self.stream)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {}
        for name, path in plans.items():
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if engine is None:
                raise BackendUnavailable(f"{Path(path).name} does not load with TensorRT {trt.__version__} on this GPU; "
                                         f"rebuild it with export/build_engines.py --backend tensorrt")
            self.engines[name] = engine
        self.tensors = {name: {engine.get_tensor_name(i): _TensorInfo.of(trt, engine, engine.get_tensor_name(i))
                               for i in range(engine.num_io_tensors)} for name, engine in self.engines.items()}
        # Graphs run one at a time on one stream, so all contexts share one activation (scratch) buffer,
        # sized for the largest engine, instead of holding one each. A fixed address is also what lets
        # captured CUDA graphs replay.
        self.memory = DeviceMemory(cudart)
        self.activations = DeviceArray(self.memory, (max(e.device_memory_size_v2 for e in self.engines.values()),),
                                       np.uint8, permanent=True)
        self.contexts = {name: self._context(name) for name in self.engines}
        self.buffers = OutputBuffers(lambda shape, dtype: DeviceArray(self.memory, shape, dtype, graph_output=True))
        static = [name for name, tensors in self.tensors.items()
                  if all(-1 not in t.shape for t in tensors.values() if t.is_input)]
        self.staging = {name: InputStaging(self.memory, self._copy) for name in static}
        self.static_outputs = {name: {n: (t.shape, t.dtype) for n, t in self.tensors[name].items() if not t.is_input}
                               for name in static}
        self.cuda_graphs = CudaGraphs(cudart, self.stream)
        self.captured_contexts: dict[tuple, Any] = {}  # one execution context per captured graph, as TensorRT advises

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.engines)

    def _select_device(self) -> None:
        """The device is per host thread in CUDA, and a runner may be called from several threads."""
        _check(self.cudart.cudaSetDevice(self.device))

    def _context(self, graph: str):
        context = self.engines[graph].create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.activations.ptr, self.activations.nbytes)
        return context

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
        self._select_device()
        host = np.ascontiguousarray(array)
        device = DeviceArray(self.memory, host.shape, host.dtype)
        self._copy(device, host)
        return device

    def download(self, array: DeviceArray) -> np.ndarray:
        self._select_device()
        host = np.empty(array.shape, array.dtype)
        _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, array.ptr, array.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return _from_bfloat16(host) if array.dtype == BFLOAT16 else host

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, DeviceArray]:
        self._select_device()
        tensors, staging = self.tensors[graph], self.staging.get(graph)
        bound = {}
        for name, info in tensors.items():
            if info.is_input:
                value = inputs[name] if isinstance(inputs[name], DeviceArray) else np.ascontiguousarray(inputs[name])
                info.check(graph, name, value)
                if staging is not None:
                    bound[name] = staging.bind(name, value)
                else:  # bound where they are (an upload is released after its launch, in stream order)
                    bound[name] = value if isinstance(value, DeviceArray) else self.upload(value)
        if staging is None or graph in self.cuda_graphs.eager:
            context = self.contexts[graph]
            outputs = self._bind(graph, context, bound)
            self._enqueue(graph, context)
            return outputs
        outputs = dict(self.buffers.next(graph, self.static_outputs[graph]))
        key = cuda_graphs.launch_key(graph, (a.ptr for a in {**bound, **outputs}.values()))
        if not self.cuda_graphs.replay(key):
            context = self.captured_contexts[key] = self._context(graph)
            self._bind(graph, context, bound, outputs)
            self.cuda_graphs.record(key, lambda: self._enqueue(graph, context))
        return outputs

    def _bind(self, graph: str, context, bound: dict[str, DeviceArray],
              outputs: dict[str, DeviceArray] | None = None) -> dict[str, DeviceArray]:
        """Set input shapes and addresses on `context`; outputs in the graph's next buffer set unless given."""
        for name, array in bound.items():
            if not context.set_input_shape(name, array.shape):
                raise ValueError(f"{graph}: input {name} of shape {list(array.shape)} is outside the engine's "
                                 f"optimization profile; rebuild the engines for this request")
        if outputs is None:
            shapes = {name: (tuple(context.get_tensor_shape(name)), info.dtype)
                      for name, info in self.tensors[graph].items() if not info.is_input}
            outputs = dict(self.buffers.next(graph, shapes))  # allocated on first use, then reused in turn
        for name, array in {**bound, **outputs}.items():
            context.set_tensor_address(name, array.ptr)
        return outputs

    def _enqueue(self, graph: str, context) -> None:
        if not context.execute_async_v3(self.stream_handle):
            raise RuntimeError(f"TensorRT failed to run {graph}")

    def synchronize(self) -> None:
        self._select_device()
        _check(self.cudart.cudaStreamSynchronize(self.stream))


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
    """One engine I/O tensor: direction, shape (-1 = dynamic) and numpy storage dtype."""

    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, trt, engine, name: str) -> "_TensorInfo":
        dtype = engine.get_tensor_dtype(name)
        return cls(engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, tuple(engine.get_tensor_shape(name)),
                   BFLOAT16 if dtype == trt.DataType.BF16 else np.dtype(trt.nptype(dtype)))

    def check(self, graph: str, name: str, array: "DeviceArray | np.ndarray") -> None:
        """A mismatch would be read as garbage by the engine, so it is refused here."""
        fits = len(array.shape) == len(self.shape) and all(d in (-1, s) for d, s in zip(self.shape, array.shape))
        if array.dtype != self.dtype or not fits:
            raise ValueError(f"{graph}: input {name} is {array.dtype}{list(array.shape)} where the engine takes "
                             f"{self.dtype}{list(self.shape)}")


# numpy has no bfloat16: bf16 tensors (activations between transformer graphs at --precision bf16) are
# stored as their 16-bit patterns and only converted when downloaded.
BFLOAT16 = np.dtype([("bfloat16", "<u2")])


def _from_bfloat16(host: np.ndarray) -> np.ndarray:
    return (host.view("<u2").astype(np.uint32) << 16).view(np.float32)
