"""Static key/value cache of the temporal transformer: one preallocated buffer and a write position."""

from __future__ import annotations

import torch


class KVCache:
    """K and V of every layer in `[layers, batch, heads, capacity, head_dim]` buffers.

    Attention of frame t reads positions [0, length + new) and appends the new frame's K/V, which
    gives NOVA's block-causal attention (text and motion prefix, then frame after frame) without a
    mask. The buffers are allocated once; nothing is concatenated or reallocated per frame.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        shape = (num_layers, batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's K/V of one layer after the cached ones; return all valid K/V."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions needed, capacity is {self.capacity}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Commit the tokens that every layer has just written."""
        self.length += num_tokens
