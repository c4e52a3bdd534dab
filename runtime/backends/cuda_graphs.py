"""Host logic shared by the backends that replay CUDA graphs (tensorrt; onnxruntime and torch on CUDA).

A captured CUDA graph replays the addresses bound when it was captured. So a graph whose inputs have
static shapes runs like this in every GPU backend:
- its inputs are bound at fixed addresses (`InputStaging`): another graph's output buffer (fixed
  itself) in place, anything else copied into the input's staging buffer, unless that buffer already
  holds it (an upload, or an eager graph's fresh output, is never written again, so its `serial`
  identifies its content: a per-request constant is copied once, a step's noise once per call);
- its outputs go to `OutputBuffers` (two sets used in turn: an output stays valid until its graph has
  run twice more);
- each distinct set of addresses (`launch_key`) is captured once and replayed from then on
  (`Captures`); a graph whose capture fails runs eagerly from then on, with a warning.
A graph whose outputs have a dynamic dim runs eagerly; one whose dynamic dims are its inputs' alone (the spatial
graph's known-token slots, a few bucket sizes) can be staged per input shape and captured once per shape.
Nothing here touches CUDA: each backend brings its copies and its capture (cuda-python for TensorRT, ONNX
Runtime's own `gpu_graph_id` captures, `torch.cuda.CUDAGraph`).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterable

log = logging.getLogger("runtime.backends")
_serials = itertools.count(1)


def new_content(value):
    """Stamp a device array whose content will never change (an upload, an eager graph's fresh output)."""
    value.serial = next(_serials)
    return value


def output_buffer(value):
    """Mark a graph output buffer: rewritten by its graph at a fixed address, so bound in place."""
    value.graph_output = True
    return value


def launch_key(graph: str, addresses: Iterable[int]) -> tuple:
    """What a captured graph is specific to: the graph and every address it binds, inputs and outputs."""
    return (graph, *addresses)


def _describe(value) -> str:
    if callable(getattr(value, "shape", None)):  # an OrtValue: shape() and data_type() are methods
        return f"{value.data_type()}{list(value.shape())}"
    return f"{value.dtype}{list(value.shape)}"


class InputStaging:
    """Fixed input buffers of one graph, so that its launches bind fixed addresses.
    `allocate(value)` makes a buffer of the value's shape and dtype (once per input, and per shape for the
    inputs named in `dynamic`, so that each shape is captured at addresses of its own); `copy(buffer, value)`
    queues a copy of the value's content into it (device to device, or from a host array, which has no serial
    and is therefore copied on every call)."""

    def __init__(self, allocate: Callable[[Any], Any], copy: Callable[[Any, Any], None],
                 dynamic: frozenset[str] = frozenset()):
        self.allocate, self.copy, self.dynamic = allocate, copy, dynamic
        self.buffers: dict[Any, Any] = {}  # input, or (input, its shape) for a dynamic one -> buffer
        self.holds: dict[Any, int | None] = {}  # the same keys -> serial of the content the buffer holds

    def bind(self, name: str, value) -> Any:
        if getattr(value, "graph_output", False):
            return value
        described = _describe(value)
        slot = (name, described) if name in self.dynamic else name
        buffer = self.buffers.get(slot)
        if buffer is None:
            buffer = self.buffers[slot] = self.allocate(value)
        if _describe(buffer) != described:
            raise ValueError(f"input {name}: {described} where the engine takes {_describe(buffer)}")
        serial = getattr(value, "serial", None)
        if serial is None or self.holds.get(slot) != serial:
            self.copy(buffer, value)
            self.holds[slot] = serial
        return buffer


class Captures:
    """Captured launches by launch key. `record` runs a launch eagerly (its result; also the warm-up a
    capture needs) and then captures it; `replay` launches the capture. Subclasses bring `_capture`
    (-> the captured graph, or None after `_failed`) and `_launch`."""

    def __init__(self):
        self.execs: dict[tuple, Any] = {}
        self.eager: set[str] = set()

    def replay(self, key: tuple) -> bool:
        captured = self.execs.get(key)
        if captured is not None:
            self._launch(captured)
        return captured is not None

    def record(self, key: tuple, enqueue: Callable[[], None]) -> None:
        enqueue()
        if key[0] not in self.eager:
            captured = self._capture(key[0], enqueue)
            if captured is not None:
                self.execs[key] = captured

    def _failed(self, graph: str, reason) -> None:
        log.warning("%s: CUDA graph capture failed (%s); it runs without CUDA graphs", graph, reason)
        self.eager.add(graph)

    def _capture(self, graph: str, enqueue: Callable[[], None]) -> Any:
        raise NotImplementedError

    def _launch(self, captured) -> None:
        raise NotImplementedError


def cuda_check(result):
    """cuda-python calls return (error, *values)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if int(error) != 0:
        raise RuntimeError(f"CUDA error {error}")
    return values[0] if len(values) == 1 else values


def native_handle(stream) -> int:
    """A cuda-python stream as the integer TensorRT and ONNX Runtime take (int() is deprecated in 13.x)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return get_cuda_native_handle(stream)
