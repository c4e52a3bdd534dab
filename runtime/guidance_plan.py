"""The guidance of one request, decided once and without torch: which passes run, which text rows and
which BOS token each row block takes, and the guidance scale of every diffusion step.

The transformer batch holds row blocks of the B samples (the rows of one block are the samples):

    block 0  cond        the prompt, the previous frame
    block 1  uncond      the negative prompt (or null text), the previous frame; with image guidance the
                         temporal encoder sees the raw BOS token instead of the previous frame
    block 2  imgcond     image guidance: the negative prompt with the previous frame
             perturbed   spatiotemporal guidance: the cond inputs again (nothing perturbs them at the
                         official HEAD, so the pass adds g_st * (cond - cond) = 0 at a third of the compute)

A build has a fixed number of blocks (`Geometry.blocks`); a request uses its first `passes`, and a build
with more blocks than the request needs runs the extra ones with scales that leave them out exactly
(`step_scales` 1: the conditional output; a third scale of 0). The torch combine of the head's outputs is
`runtime.guidance.Guidance`; the compiled graphs do the same arithmetic on the feeds made from this plan.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BLOCKS = ("cond", "uncond")  # the text rows of blocks 0 and 1; block 2 repeats one of them (`text_blocks`)


@dataclasses.dataclass(frozen=True)
class GuidancePlan:
    """The official guidance options (`diffnext`'s GuidanceScaler) and what follows from them."""

    scale: float = 1.0  # guidance_scale; <= 1: no guidance
    trunc: float = 0.0  # guidance_trunc: guidance off from the first diffusion timestep below it (0: never)
    renorm: float = 1.0  # guidance_renorm; >= 1: off
    image_scale: float = 0.0  # image_guidance_scale: a third pass
    spatiotemporal_scale: float = 0.0  # spatiotemporal_guidance_scale: a third pass

    @classmethod
    def of(cls, request) -> "GuidancePlan":
        """The guidance of a `runtime.request.Request`."""
        return cls(request.guidance_scale, request.guidance_trunc, request.guidance_renorm,
                   request.image_guidance_scale, request.spatiotemporal_guidance_scale)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on (the official rule: a scale above 1)."""
        return self.scale > 1

    @property
    def third_pass(self) -> bool:
        return self.guided and (self.image_scale > 0 or self.spatiotemporal_scale > 0)

    @property
    def passes(self) -> int:
        """Row blocks the request needs: 1 unguided, 2 with CFG, 3 with a third pass."""
        return 3 if self.third_pass else 2 if self.guided else 1

    @property
    def truncated(self) -> bool:
        return self.guided and self.trunc > 0

    @property
    def renormed(self) -> bool:
        return self.guided and self.renorm < 1

    @property
    def third_scale(self) -> float:
        """The third pass's scale (the graphs' third_scale; 0: plain CFG on a three-block build)."""
        return self.image_scale or self.spatiotemporal_scale

    def text_blocks(self, blocks: int) -> tuple[str, ...]:
        """The text rows ("cond" or "uncond") each of `blocks` row blocks takes: the third block repeats the
        negative rows for image guidance, else the prompt's."""
        return (*BLOCKS, "uncond" if self.image_scale else "cond")[:blocks]

    @property
    def raw_bos_block(self) -> int | None:
        """The block whose temporal encoder sees the raw BOS token at every frame (image guidance's uncond)."""
        return 1 if self.image_scale else None

    def raw_bos(self, blocks: int, batch: int) -> np.ndarray:
        """The temporal graphs' raw_bos [blocks * batch] bool: true on the rows of `raw_bos_block`."""
        if self.raw_bos_block is None:
            return np.zeros(blocks * batch, bool)
        return np.arange(blocks * batch) // batch == self.raw_bos_block

    def guided_steps(self, timesteps: np.ndarray) -> np.ndarray:
        """[S] bool: whether guidance runs at each diffusion step of a mask step. guidance_trunc turns it off
        from the first timestep below it to the end of the mask step (timesteps decrease), compared as the
        official float(timestep) < guidance_trunc."""
        return self.guided & ~np.logical_or.accumulate(np.asarray(timesteps, np.float64) < self.trunc)

    def step_scales(self, timesteps: np.ndarray) -> np.ndarray:
        """The graphs' guidance_scale per diffusion step [S] float32: the request's where guidance runs, else 1
        (the graphs then take the conditional output)."""
        return np.where(self.guided_steps(timesteps), np.float32(self.scale), np.float32(1)).astype(np.float32)
