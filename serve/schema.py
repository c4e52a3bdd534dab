"""The HTTP request models. Unknown fields and wrong JSON types are refused (422); values are checked by the
runner (400, its one-sentence refusal)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Options(BaseModel):
    """Options shared by images and videos: the runner's, under its names. Unknown fields and wrong
    JSON types are refused (422); values are checked by the runner (400, its one-sentence refusal)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # an id of GET /v1/models; default: the only model of the endpoint's kind
    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2 ** 64)  # None: a random seed
    num_inference_steps: int = 64
    num_diffusion_steps: int = 25
    guidance_scale: float = 5.0
    guidance_trunc: float = 0.0  # the official options the compiled runner serves
    flow_shift: float | None = None
    num_images_per_prompt: int = 1


class ImageRequest(_Options):
    pass


class VideoRequest(_Options):
    max_latent_length: int = 1
    motion_flow: float | None = None
    fps: int = Field(12, ge=1, le=240)
    image: str | None = None  # image-to-video: the first frame, a base64 PNG or JPEG (serve/uploads.py)


RUNNER_OPTIONS = ("prompt", "negative_prompt", "num_inference_steps", "num_diffusion_steps", "guidance_scale",
                  "guidance_trunc", "flow_shift", "num_images_per_prompt", "max_latent_length", "motion_flow", "image")
