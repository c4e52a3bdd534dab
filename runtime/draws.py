"""The random numbers of one generation, drawn in the official order.

NOVA draws, from one generator (NOVA_SPEC §5.11): the image-to-video posterior sample; then per
frame and mask step the token order (once, first step of the first generated frame), the initial
noise, and for DDPM one noise tensor per stochastic diffusion step. `RandomDraws` produces them
from a torch.Generator exactly as the official code does; `RecordedDraws` keeps a copy so another
runtime can be fed the identical tensors through `ReplayDraws`.
"""

from __future__ import annotations

import torch


class RandomDraws:
    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def _device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self._device(), dtype=dtype)

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self._device(), dtype=dtype)


class RecordedDraws(RandomDraws):
    """Draws from a generator and keeps every tensor, in order, in `self.tensors`."""

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__(generator)
        self.tensors: list[torch.Tensor] = []

    def uniform(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.tensors.append(super().uniform(shape, dtype))
        return self.tensors[-1]

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.tensors.append(super().normal(shape, dtype))
        return self.tensors[-1]


class ReplayDraws(RandomDraws):
    """Hands out given tensors in order; a request of another shape means the consumers disagree."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__(None)
        self.tensors, self.position = list(tensors), 0

    def _next(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if self.position >= len(self.tensors):
            raise ValueError(f"replay exhausted: draw {self.position} of shape {tuple(shape)} was never recorded")
        value = self.tensors[self.position]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"replay draw {self.position} has shape {tuple(value.shape)}, {tuple(shape)} requested")
        self.position += 1
        return value.to(dtype)

    uniform = _next
    normal = _next
