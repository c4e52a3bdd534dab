"""The random numbers of one generation, drawn in the official order.

NOVA draws, from one generator (NOVA_SPEC §5.11): the image-to-video posterior sample; then per
frame and mask step the token order (once, first step of the first generated frame), the initial
noise, and for DDPM one noise tensor per stochastic diffusion step. `RandomDraws` produces them
from a torch.Generator exactly as the official code does; `RecordedDraws` keeps a copy so another
runtime can be fed the identical tensors through `ReplayDraws`.

Without torch (a TensorRT-only deployment) the runner uses `NumpyDraws`: numpy's PCG64 seeded with
the seed. Same distributions, other numbers: a seed then does not reproduce the reference's image.

`dtype` is a torch dtype or a precision name ("fp32", "fp16", "bf16"): 16-bit draws differ from
rounded fp32 draws in torch, so the runner draws in its denoise graph's precision as the official
code draws in the model's dtype.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from runtime.graphs.profile import PRECISION_DTYPES
from runtime.options import SEED, SEED_LIMIT


def torch_dtype(dtype: Any):
    """A torch dtype for a torch dtype or a precision name."""
    import torch

    return getattr(torch, PRECISION_DTYPES[dtype]) if isinstance(dtype, str) else dtype


class RandomDraws:
    """torch.Generator draws (CPU, or the generator's device), as the official code makes them."""

    def __init__(self, generator=None):
        self.generator = generator

    def _device(self):
        import torch

        return self.generator.device if self.generator is not None else torch.device("cpu")

    def uniform(self, shape: tuple[int, ...], dtype: Any):
        import torch

        return torch.rand(shape, generator=self.generator, device=self._device(), dtype=torch_dtype(dtype))

    def normal(self, shape: tuple[int, ...], dtype: Any):
        import torch

        return torch.randn(shape, generator=self.generator, device=self._device(), dtype=torch_dtype(dtype))

    def token_order(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The token order: argsort of a uniform draw [B, N, 1] along the tokens, with torch's argsort
        (16-bit draws have ties; the same sort breaks them as the reference does). -> [B, N, 1] int64."""
        return self.uniform(shape, dtype).argsort(dim=1).cpu().numpy()


class RecordedDraws(RandomDraws):
    """Draws from a generator and keeps every tensor, in order, in `self.tensors`."""

    def __init__(self, generator=None):
        super().__init__(generator)
        self.tensors: list = []

    def uniform(self, shape: tuple[int, ...], dtype: Any):
        self.tensors.append(super().uniform(shape, dtype))
        return self.tensors[-1]

    def normal(self, shape: tuple[int, ...], dtype: Any):
        self.tensors.append(super().normal(shape, dtype))
        return self.tensors[-1]


class ReplayDraws(RandomDraws):
    """Hands out given tensors in order; a request of another shape means the consumers disagree."""

    def __init__(self, tensors: list):
        super().__init__(None)
        self.tensors, self.position = list(tensors), 0

    def _next(self, shape: tuple[int, ...], dtype: Any):
        if self.position >= len(self.tensors):
            raise ValueError(f"replay exhausted: draw {self.position} of shape {tuple(shape)} was never recorded")
        value = self.tensors[self.position]
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"replay draw {self.position} has shape {tuple(value.shape)}, {tuple(shape)} requested")
        self.position += 1
        return value.to(torch_dtype(dtype))

    uniform = _next
    normal = _next


class NumpyDraws:
    """The fallback without torch: numpy PCG64 draws (float32, rounded to fp16 for fp16; numpy has no
    bf16, so bf16 draws stay float32). Not the reference's numbers for the same seed. `dtype` is a
    precision name (there is no torch dtype without torch)."""

    def __init__(self, seed: int | None = None):
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _cast(values: np.ndarray, dtype: Any) -> np.ndarray:
        return values.astype(np.float16) if dtype == "fp16" else values

    def uniform(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self._cast(self.rng.random(shape, dtype=np.float32), dtype)

    def normal(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self._cast(self.rng.standard_normal(shape, dtype=np.float32), dtype)

    def token_order(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.argsort(self.uniform(shape, dtype), axis=1, kind="stable")


def call_draws(seed: int | None, generator, torch_module) -> RandomDraws | NumpyDraws:
    """The draws of one runner call: the generator's (a torch.Generator), else the seed's, else torch's global
    generator (as the official pipeline without one). torch_module: torch, or None where it is not installed
    (numpy draws)."""
    if generator is not None:
        if seed is not None:
            raise ValueError("give at most one of seed and generator")
        return RandomDraws(generator)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not SEED.minimum <= seed <= SEED.maximum):
        raise ValueError(f"seed must be an integer in [0, 2**{SEED_LIMIT.bit_length() - 1}), got {seed!r}")
    if torch_module is None:
        return NumpyDraws(seed)
    return RandomDraws(None if seed is None else torch_module.Generator().manual_seed(int(seed)))


def installed_torch():
    """torch, for the seeded draws, or None where it is not installed (numpy draws)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def seeded(seed: int | None) -> RandomDraws | NumpyDraws:
    """Draws from `seed` (None: a random one): a torch.Generator's where torch is installed (the reference's
    numbers), else numpy's."""
    torch = installed_torch()
    if torch is None:
        return NumpyDraws(seed)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed))
    return RandomDraws(generator)


class PerRowDraws:
    """Draws for a call that batches independent requests: one source of draws per request row (RandomDraws
    or NumpyDraws), each row's slice of every draw from its own source, concatenated along dim 0. Row i then
    gets exactly the numbers a call of its own with `rows[i]` would get. A draw whose dim 0 is 1 (the
    image-to-video posterior sample, shared by the rows) comes from the first row's source."""

    def __init__(self, rows: list[RandomDraws | NumpyDraws]):
        if not rows:
            raise ValueError("PerRowDraws needs at least one row")
        self.rows = list(rows)

    @classmethod
    def from_seeds(cls, seeds: list[int | None]) -> "PerRowDraws":
        """Row i draws from seeds[i] as `seeded` makes it (torch where installed, else numpy)."""
        return cls([seeded(seed) for seed in seeds])

    def _per_row(self, name: str, shape: tuple[int, ...], dtype: Any):
        if shape[0] == 1:
            return getattr(self.rows[0], name)(shape, dtype)
        if shape[0] != len(self.rows):
            raise ValueError(f"a draw of {shape[0]} rows from {len(self.rows)} sources")
        parts = [getattr(row, name)((1, *shape[1:]), dtype) for row in self.rows]
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts)
        import torch

        return torch.cat(parts)

    def uniform(self, shape: tuple[int, ...], dtype: Any):
        return self._per_row("uniform", shape, dtype)

    def normal(self, shape: tuple[int, ...], dtype: Any):
        return self._per_row("normal", shape, dtype)

    def token_order(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return self._per_row("token_order", shape, dtype)
