"""TensorRT plans over CUDA buffers (TensorRT 10.x / 11.x API, cuda-python 13 bindings).

Needs `tensorrt` and `cuda-python` on a machine with an NVIDIA GPU; neither torch nor onnxruntime.
Device arrays are `DeviceArray`s (a CUDA allocation with shape and dtype); every graph runs through
`execute_async_v3` on one stream, with input and output addresses bound by tensor name. Outputs go
into `OutputBuffers` (allocated once, used in turn), all execution contexts share one activation
buffer (user-managed device memory, sized for the largest engine), and uploads reuse freed memory of
their size (`DeviceMemory`), so steady-state steps call neither cudaMalloc nor cudaFree. Not done:
CUDA-graph capture of the per-step launches (it needs fixed input addresses: per-call uploads would
first be copied into staging buffers).

Status: written against the documented API; NOT executed anywhere yet (TensorRT cannot be installed
on the machines this project was developed on). Its tests skip with that reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from runtime.backends.base import Backend, BackendUnavailable, OutputBuffers


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
    then cost no cudaMalloc / cudaFree (which synchronizes the device) after the first request. Safe
    because every launch and copy is synchronized before its arrays can be dropped."""

    def __init__(self, cudart):
        self.cudart, self.free = cudart, {}

    def take(self, nbytes: int) -> int:
        spare = self.free.get(nbytes)
        return spare.pop() if spare else _check(self.cudart.cudaMalloc(max(nbytes, 1)))

    def give(self, ptr: int, nbytes: int) -> None:
        self.free.setdefault(nbytes, []).append(ptr)

    def __del__(self):
        for pointers in self.free.values():
            for ptr in pointers:
                self.cudart.cudaFree(ptr)


class DeviceArray:
    """A CUDA allocation holding one array."""

    def __init__(self, memory: DeviceMemory, shape: tuple[int, ...], dtype: np.dtype):
        self.memory, self.shape, self.dtype = memory, tuple(shape), np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.ptr = memory.take(self.nbytes)

    def __del__(self):
        if getattr(self, "ptr", None):
            self.memory.give(self.ptr, self.nbytes)


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
        # Graphs run one at a time on one stream, so all contexts share one activation (scratch) buffer,
        # sized for the largest engine, instead of holding one each.
        self.memory = DeviceMemory(cudart)
        self.activations = DeviceArray(self.memory, (max(e.device_memory_size_v2 for e in self.engines.values()),),
                                       np.uint8)
        for context in self.contexts.values():
            context.set_device_memory(self.activations.ptr, self.activations.nbytes)
        self.buffers = OutputBuffers(lambda shape, dtype: DeviceArray(self.memory, shape, dtype))

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.engines)

    def upload(self, array: np.ndarray) -> DeviceArray:
        host = np.ascontiguousarray(array)
        device = DeviceArray(self.memory, host.shape, host.dtype)
        _check(self.cudart.cudaMemcpyAsync(device.ptr, host.ctypes.data, device.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))  # host buffer may go away after return
        return device

    def download(self, array: DeviceArray) -> np.ndarray:
        host = np.empty(array.shape, array.dtype)
        _check(self.cudart.cudaMemcpyAsync(host.ctypes.data, array.ptr, array.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return host

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, DeviceArray]:
        trt, engine, context = self.trt, self.engines[graph], self.contexts[graph]
        keep = []  # uploaded inputs must outlive the asynchronous launch
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                value = inputs[name] if isinstance(inputs[name], DeviceArray) else self.upload(np.asarray(inputs[name]))
                keep.append(value)
                context.set_input_shape(name, value.shape)
                context.set_tensor_address(name, value.ptr)
        shapes = {name: (tuple(context.get_tensor_shape(name)), np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
                  for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT}
        outputs = dict(self.buffers.next(graph, shapes))  # allocated on first use, then reused in turn
        for name, array in outputs.items():
            context.set_tensor_address(name, array.ptr)
        if not context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT failed to run {graph}")
        _check(self.cudart.cudaStreamSynchronize(self.stream))  # before `keep` is released
        return outputs

    def synchronize(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self.stream))
