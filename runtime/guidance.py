"""Guidance in torch: the reference pipeline's row stacking and combine of the head's outputs, on the one
guidance plan (`runtime.guidance_plan`: blocks, rows, truncation), as `diffnext/models/guidance_scaler.py`
applies it. The combine per sample (renorm rescales toward the cond norm):

    plain:           renorm(u + g (c - u))
    image:           renorm(u + g (c - i)) + g_img (i - u)
    spatiotemporal:  renorm(u + g (c - u)) + g_st (c - p)

The float operations follow the official order, so a seed gives the official numbers.
"""

from __future__ import annotations

import torch

from runtime.guidance_plan import BLOCKS, GuidancePlan


class Guidance(GuidancePlan):
    """The plan's torch operations for the reference pipeline."""

    def text_rows(self, condition: torch.Tensor) -> torch.Tensor:
        """Condition prefix [cond; uncond] (or [cond] unguided) -> one block per pass."""
        if self.passes < 3:
            return condition
        rows = dict(zip(BLOCKS, condition.chunk(2)))
        return torch.cat([rows[block] for block in self.text_blocks(self.passes)])

    def stack(self, x: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """[B, ...] -> [passes * B, ...]. The `raw_bos_block` is `uncond` (broadcast) where given."""
        blocks = [x] * self.passes
        if uncond is not None and self.raw_bos_block is not None and self.passes == 3:
            blocks[self.raw_bos_block] = uncond.expand_as(x)
        return torch.cat(blocks)

    def combine(self, out: torch.Tensor, passes: int) -> torch.Tensor:
        """Head outputs of `passes` blocks [passes * B, ...] -> the guided output [B, ...]."""
        if passes == 1:
            return out
        cond, uncond, *third = out.chunk(passes)
        if self.image_scale:
            guided = self._renorm(uncond + (cond - third[0]) * self.scale, cond)
            return guided + (third[0] - uncond) * self.image_scale
        guided = self._renorm(uncond + (cond - uncond) * self.scale, cond)
        if self.spatiotemporal_scale:
            return guided + (cond - third[0]) * self.spatiotemporal_scale
        return guided

    def _renorm(self, guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Scale each sample by its norm ratio |cond| / |guided|, clamped to [renorm, 1]."""
        if self.renorm >= 1:
            return guided
        dims = tuple(range(1, guided.dim()))
        ratio = cond.norm(dim=dims, keepdim=True) / guided.norm(dim=dims, keepdim=True)
        return guided * ratio.clamp(self.renorm, 1)
