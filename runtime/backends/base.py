"""The backend interface: upload host arrays, run a named graph, download results."""

from __future__ import annotations

import abc
from typing import Any, Callable, Mapping

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend's library or device is missing here (the message is one sentence for the user)."""


class Backend(abc.ABC):
    """Device arrays are whatever the backend keeps (torch tensors, numpy arrays, CUDA buffers):
    graph outputs are fed to later graphs as they are, without passing through the host.

    An output stays valid until its graph has run twice more (backends may write outputs into
    `OutputBuffers`); `download` returns a host copy that stays valid."""

    name: str

    @abc.abstractmethod
    def upload(self, array: np.ndarray) -> Any:
        """A host array as a device array."""

    @abc.abstractmethod
    def download(self, array: Any) -> np.ndarray:
        """A device array as a host array."""

    @abc.abstractmethod
    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run one graph; inputs and outputs by the names of its declaration."""

    def synchronize(self) -> None:
        """Wait for queued device work (timings read a host clock after this)."""

    @property
    def graphs(self) -> tuple[str, ...]:
        return ()


class OutputBuffers:
    """Graph outputs written into buffers allocated once: two sets per graph and output shape, used
    in turn. A call never writes the buffer it reads (x_next feeds the next denoise call, the KV cache
    the next temporal step), and an output stays valid until its graph has run twice more, which is
    all the runner's loops keep. Shapes are the static ones of the build, so the sets are allocated on
    the first request and reused by every later one."""

    def __init__(self, allocate: Callable[[tuple[int, ...], np.dtype], Any]):
        self.allocate = allocate
        self.sets: dict[tuple, list[dict[str, Any]]] = {}
        self.turn: dict[tuple, int] = {}

    def next(self, graph: str, outputs: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, Any]:
        """The buffer set for this call of `graph`; outputs: name -> (shape tuple, the backend's dtype)."""
        key = (graph, tuple(outputs.items()))
        if key not in self.sets:
            self.sets[key] = [{name: self.allocate(tuple(shape), dtype) for name, (shape, dtype) in outputs.items()}
                              for _ in range(2)]
            self.turn[key] = 0
        turn = self.turn[key]
        self.turn[key] = 1 - turn
        return self.sets[key][turn]
