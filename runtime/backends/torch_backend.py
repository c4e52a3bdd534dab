"""The graphs' PyTorch modules as a backend (eager, CPU or CUDA): parity baseline of the exports.

Outputs are the modules' own tensors, not `OutputBuffers`: they stay valid for as long as they are
held (more than the interface promises), and on CUDA torch's caching allocator hands freed blocks
back without cudaMalloc. Fixed buffers would only add a copy per output here; they pay off where a
launch is replayed at fixed addresses (the TensorRT backend's CUDA graphs)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from runtime.backends.base import Backend, BackendUnavailable
from runtime.graphs.contract import GraphSpec, run_module


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, specs: Mapping[str, GraphSpec], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(f"the torch backend cannot use {device}: this torch build sees no CUDA GPU")
        self.specs = dict(specs)
        self.modules = {name: spec.build().to(self.device) for name, spec in self.specs.items()}

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(self.modules)

    def upload(self, array: np.ndarray) -> torch.Tensor:
        host = np.ascontiguousarray(array)
        return torch.from_numpy(host if host.flags.writeable else host.copy()).to(self.device)

    def download(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy() if array.dtype == torch.bfloat16 else array.detach().cpu().numpy()

    def run(self, graph: str, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        return run_module(self.specs[graph], self.modules[graph], inputs)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
