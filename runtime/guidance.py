"""Classifier-free guidance with the official HEAD options, as `diffnext/models/guidance_scaler.py` applies it.

The transformer batch holds `passes` blocks of the B samples (rows of one block are the samples):

    block 0  cond        the prompt, the previous frame
    block 1  uncond      the negative prompt (or null text), the previous frame; with image guidance the
                         temporal encoder sees the raw BOS token instead of the previous frame
    block 2  imgcond     image guidance: the negative prompt with the previous frame
             perturbed   spatiotemporal guidance: the cond inputs again (nothing perturbs them at HEAD, so
                         the pass costs a third of the compute and adds g_st * (cond - cond) = 0)

and the diffusion head's outputs are combined per sample (renorm rescales toward the cond norm):

    plain:           renorm(u + g (c - u))
    image:           renorm(u + g (c - i)) + g_img (i - u)
    spatiotemporal:  renorm(u + g (c - u)) + g_st (c - p)

`guidance_trunc` turns guidance off for the rest of a mask step from the first diffusion timestep below it:
the head then runs on block 0 only. The float operations follow the official order, so a seed gives the
official numbers.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Guidance:
    scale: float = 1.0  # guidance_scale; <= 1: no guidance
    trunc: float = 0.0  # guidance_trunc
    renorm: float = 1.0  # guidance_renorm; >= 1: off
    image_scale: float = 0.0  # image_guidance_scale
    spatiotemporal_scale: float = 0.0  # spatiotemporal_guidance_scale

    @classmethod
    def of(cls, request) -> "Guidance":
        """The guidance of a `runtime.request.Request`."""
        return cls(request.guidance_scale, request.guidance_trunc, request.guidance_renorm,
                   request.image_guidance_scale, request.spatiotemporal_guidance_scale)

    @property
    def passes(self) -> int:
        if self.scale <= 1:
            return 1
        return 3 if self.image_scale or self.spatiotemporal_scale else 2

    def text_rows(self, condition: torch.Tensor) -> torch.Tensor:
        """Condition prefix [cond; uncond] (or [cond] unguided) -> one block per pass."""
        if self.passes < 3:
            return condition
        cond, uncond = condition.chunk(2)
        return torch.cat([cond, uncond, uncond if self.image_scale else cond])

    def stack(self, x: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        """[B, ...] -> [passes * B, ...]. With image guidance, block 1 is `uncond` (broadcast) where given."""
        blocks = [x] * self.passes
        if self.image_scale and uncond is not None and self.passes == 3:
            blocks[1] = uncond.expand_as(x)
        return torch.cat(blocks)

    def truncates(self, timestep: float) -> bool:
        """Whether guidance stops at this diffusion timestep (for the rest of the mask step)."""
        return self.passes > 1 and self.trunc > 0 and timestep < self.trunc

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
