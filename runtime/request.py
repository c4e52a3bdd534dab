"""A generation request: the official pipeline's options, validated against a checkpoint config.

Shared by the reference pipeline and the runner; it needs neither torch nor a backend.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

MAX_MASK_STEPS = 1 << 20  # the schedule is computed over every step: a bound keeps absurd requests cheap to refuse
# The official default; `motion_flow=None` means it. Image checkpoints ignore it, as the official
# pipeline does (its call passes motion_flow=5 to every checkpoint).
DEFAULT_MOTION_FLOW = 5.0


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request (shared by the reference pipeline and the runner)."""

    prompts: list[str] | None
    negative_prompts: list[str] | None
    prompt_embeds: list | None  # per prompt, [tokens, text_dim] arrays or tensors
    negative_prompt_embeds: list | None
    num_inference_steps: int
    num_diffusion_steps: int
    guidance_scale: float
    max_latent_length: int
    motion_flow: float
    image: np.ndarray | None
    num_images_per_prompt: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompts if self.prompts is not None else self.prompt_embeds)

    @property
    def batch(self) -> int:
        return self.num_prompts * self.num_images_per_prompt

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _prompt_list(name: str, value, count: int | None = None) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {type(value).__name__}")
    wrong = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if wrong is not None:
        raise ValueError(f"{name} must be a string or a list of strings; entry {wrong} is "
                         f"{type(values[wrong]).__name__} {values[wrong]!r}")
    if count is not None and len(values) != count:
        if len(values) == 1:
            return list(values) * count
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts")
    return list(values)


def _embeds_list(name: str, value, dim: int, count: int | None = None) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of [tokens, {dim}] arrays")
    for array in value:
        shape = tuple(getattr(array, "shape", ()))
        if len(shape) != 2 or shape[1] != dim:
            raise ValueError(f"{name} entries must be [tokens, {dim}] arrays or tensors")
    if count is not None and len(value) != count:
        raise ValueError(f"{name} has {len(value)} entries for {count} prompts")
    return list(value)


def validate_request(config, prompt=None, *, negative_prompt=None, prompt_embeds=None, negative_prompt_embeds=None,
                     num_inference_steps=64, num_diffusion_steps=25, guidance_scale=5.0, max_latent_length=1,
                     motion_flow=None, image=None, num_images_per_prompt=1, **unknown) -> Request:
    """The official pipeline's options with its defaults (the one place the runner takes them from),
    checked against the checkpoint before any work; raise ValueError naming the problem (TypeError for
    an option that does not exist)."""
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("give exactly one of prompt and prompt_embeds")
    prompts = _prompt_list("prompt", prompt) if prompt is not None else None
    embeds = _embeds_list("prompt_embeds", prompt_embeds, config.text_token_dim) if prompt_embeds is not None else None
    count = len(prompts or embeds)
    negatives = _prompt_list("negative_prompt", negative_prompt, count) if negative_prompt is not None else None
    negative_embeds = None
    if negative_prompt_embeds is not None:
        if negative_prompt is not None:
            raise ValueError("give at most one of negative_prompt and negative_prompt_embeds")
        negative_embeds = _embeds_list("negative_prompt_embeds", negative_prompt_embeds, config.text_token_dim, count)
    length = _positive_int("max_latent_length", max_latent_length)
    if length > 1 and not config.has_motion:
        raise ValueError(f"this is an image checkpoint: max_latent_length must be 1, got {length}")
    steps = _positive_int("num_inference_steps", num_inference_steps)
    if steps > MAX_MASK_STEPS:
        raise ValueError(f"num_inference_steps must be at most {MAX_MASK_STEPS} (steps beyond a frame's "
                         f"{config.num_image_tokens} tokens predict nothing and are dropped), got {steps}")
    if image is not None:
        if not config.has_motion:
            raise ValueError("image-to-video needs a video checkpoint; this one generates images")
        height, width = config.image_size
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (height, width, 3):
            got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"image must be a uint8 array of shape ({height}, {width}, 3) (HWC, the model "
                             f"resolution), got {got}")
        if length < 2:
            raise ValueError("image-to-video needs max_latent_length >= 2 (the image is frame 0)")
    return Request(
        prompts=prompts, negative_prompts=negatives, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
        num_inference_steps=steps,
        num_diffusion_steps=_positive_int("num_diffusion_steps", num_diffusion_steps),
        guidance_scale=_number("guidance_scale", guidance_scale), max_latent_length=length,
        motion_flow=DEFAULT_MOTION_FLOW if motion_flow is None else _number("motion_flow", motion_flow), image=image,
        num_images_per_prompt=_positive_int("num_images_per_prompt", num_images_per_prompt))
