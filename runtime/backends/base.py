"""The backend interface: upload host arrays, run a named graph, download results."""

from __future__ import annotations

import abc
from typing import Any, Mapping

import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend's library or device is missing here (the message is one sentence for the user)."""


class Backend(abc.ABC):
    """Device arrays are whatever the backend keeps (torch tensors, numpy arrays, CUDA buffers):
    graph outputs are fed to later graphs as they are, without passing through the host."""

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
