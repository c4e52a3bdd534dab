"""A generation request: the official pipeline's options, validated against a checkpoint config.

Shared by the reference pipeline and the runner; it needs neither torch nor a backend (PIL resizes images).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import PIL.Image

from runtime.guidance_plan import GuidancePlan
from runtime.images import fit_image
from runtime.model.config import NOVAConfig
from runtime.options import DEFAULT_MOTION_FLOW, MAX_IMAGES_PER_REQUEST, MAX_PROMPT_CHARS, OPTIONS


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
    image: np.ndarray | None  # uint8 [H, W, 3] at the model resolution (`fit_image`)
    num_images_per_prompt: int
    # The official HEAD's further options (guidance_scaler.py, pipeline_nova.py); the defaults are neutral.
    guidance_trunc: float = 0.0
    guidance_renorm: float = 1.0
    image_guidance_scale: float = 0.0
    spatiotemporal_guidance_scale: float = 0.0
    flow_shift: float | None = None
    latents: list | None = None  # prefilled latent frames, each [batch, C, h, w] (arrays or tensors)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts if self.prompts is not None else self.prompt_embeds)

    @property
    def batch(self) -> int:
        return self.num_prompts * self.num_images_per_prompt

    @property
    def guidance(self) -> GuidancePlan:
        return GuidancePlan.of(self)

    @property
    def guided(self) -> bool:
        return self.guidance.guided

    @property
    def guidance_passes(self) -> int:
        """Transformer rows per sample (`GuidancePlan.passes`)."""
        return self.guidance.passes

    @property
    def extra_options(self) -> tuple[str, ...]:
        """The official HEAD options this request uses that change the generation loop, in signature order.
        flow_shift is not one: it only changes the sampler table. trunc and renorm do nothing unguided."""
        used = {"guidance_trunc": self.guidance.truncated, "guidance_renorm": self.guidance.renormed,
                "image_guidance_scale": self.image_guidance_scale > 0,
                "spatiotemporal_guidance_scale": self.spatiotemporal_guidance_scale > 0,
                "latents": self.latents is not None}
        return tuple(name for name, on in used.items() if on)


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
    long = next((i for i, v in enumerate(values) if len(v) > MAX_PROMPT_CHARS), None)
    if long is not None:
        raise ValueError(f"{name} entry {long} has {len(values[long])} characters: at most {MAX_PROMPT_CHARS}")
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


def _image(image, height: int, width: int) -> np.ndarray:
    """Any-size uint8 RGB picture -> the model resolution, as the official demo prepares it (`fit_image`)."""
    if not isinstance(image, PIL.Image.Image) and not (
            isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.size > 0):
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 [H, W, 3] RGB array or a PIL image, got {got}")
    return fit_image(image, height, width)


def _latent_frames(value, shape: tuple[int, ...]) -> list:
    """The official `latents`: a list of latent frames, each [batch, C, h, w]; the last becomes frame 0."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"latents must be a non-empty list of {list(shape)} latent frames (batch, C, h, w)")
    for i, frame in enumerate(value):
        if tuple(getattr(frame, "shape", ())) != shape:
            raise ValueError(f"latents[{i}] must have shape {list(shape)} (batch, C, h, w), got "
                             f"{list(getattr(frame, 'shape', [])) or type(frame).__name__}")
    return list(value)


def validate_request(config: NOVAConfig, prompt: str | Sequence[str] | None = None, **options: Any) -> Request:
    """The official pipeline's options with their declared defaults and ranges (`runtime.options`), checked
    against the checkpoint before any work; raise ValueError naming the problem (TypeError for an option
    that does not exist)."""
    unknown = options.keys() - OPTIONS.keys()
    if unknown:
        raise TypeError(f"unknown options: {', '.join(sorted(unknown))}")
    given = {name: option.default for name, option in OPTIONS.items()} | options | {"prompt": prompt}
    number = {name: option.check(given[name]) for name, option in OPTIONS.items() if option.type in (int, float)
              and name != "num_inference_steps"}
    prompt, prompt_embeds, latents = given["prompt"], given["prompt_embeds"], given["latents"]
    negative_prompt, negative_prompt_embeds, image = (given["negative_prompt"], given["negative_prompt_embeds"],
                                                      given["image"])
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
    length = number["max_latent_length"]
    if length > 1 and not config.has_motion:
        raise ValueError(f"this is an image checkpoint: max_latent_length must be 1, got {length}")
    steps = OPTIONS["num_inference_steps"].check(
        given["num_inference_steps"],
        why_maximum=f"steps beyond a frame's {config.num_image_tokens} tokens predict nothing and are dropped")
    if image is not None:
        if not config.has_motion:
            raise ValueError("image-to-video needs a video checkpoint; this one generates images")
        if latents is not None:  # the official pipeline would ignore the image (no encode, no draw)
            raise ValueError("give at most one of image and latents (the official pipeline ignores image when "
                             "latents are given)")
        image = _image(image, *config.image_size)
    batch = count * number["num_images_per_prompt"]
    if batch > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{count} prompt(s) x {number['num_images_per_prompt']} image(s) per prompt = {batch} "
                         f"images: at most {MAX_IMAGES_PER_REQUEST} per request")
    guidance = number["guidance_scale"]
    on = [name for name in ("image_guidance_scale", "spatiotemporal_guidance_scale") if number[name] > 0]
    if len(on) == 2:  # each adds its own third pass; the official code stacks 4 text rows on 3 frame rows and fails
        raise ValueError("image_guidance_scale and spatiotemporal_guidance_scale cannot be combined (each adds its "
                         "own third guidance pass; the official pipeline fails on both)")
    if on and guidance <= 1:  # officially the third pass's rows are cut from a CFG batch that does not exist
        raise ValueError(f"{on[0]} needs guidance_scale > 1 (it adds a third pass to classifier-free guidance)")
    return Request(
        prompts=prompts, negative_prompts=negatives, prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
        num_inference_steps=steps, num_diffusion_steps=number["num_diffusion_steps"], guidance_scale=guidance,
        max_latent_length=length,
        motion_flow=DEFAULT_MOTION_FLOW if number["motion_flow"] is None else number["motion_flow"], image=image,
        num_images_per_prompt=number["num_images_per_prompt"], guidance_trunc=number["guidance_trunc"],
        guidance_renorm=number["guidance_renorm"], image_guidance_scale=number["image_guidance_scale"],
        spatiotemporal_guidance_scale=number["spatiotemporal_guidance_scale"], flow_shift=number["flow_shift"],
        latents=None if latents is None else _latent_frames(latents, (batch, config.image_dim, *config.latent_size)))
