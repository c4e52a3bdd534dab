"""The HTTP request models, made from the option declarations (`runtime.options`): names, JSON types and
defaults come from there, so they cannot drift from the runner's. Unknown fields and wrong JSON types are
refused (422); values are checked by the runner (400, its one-sentence refusal), except the seed and the
frame rate, which only the service takes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from runtime.options import FPS, OPTIONS, SEED, SEED_LIMIT, Option

# The runner's options each endpoint takes, under the runner's names.
IMAGE_OPTIONS = ("prompt", "negative_prompt", "num_inference_steps", "num_diffusion_steps", "guidance_scale",
                 "guidance_trunc", "flow_shift", "num_images_per_prompt")
VIDEO_OPTIONS = (*IMAGE_OPTIONS, "max_latent_length", "motion_flow")
RUNNER_OPTIONS = (*VIDEO_OPTIONS, "image")  # image: base64 over HTTP, decoded by the ingress (serve/uploads.py)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # an id of GET /v1/models; default: the only model of the endpoint's kind
    seed: int | None = Field(SEED.default, ge=SEED.minimum, lt=SEED_LIMIT, description=SEED.help)


def _field(option: Option) -> tuple[Any, Any]:
    """A declared option as a pydantic field: its JSON type and default. The prompt is required here
    (HTTP takes no text features)."""
    kind = str | list[str] if option.type is str else option.type
    if option.name == "prompt":
        return kind, Field(description=option.help)
    return (kind | None if option.default is None else kind), Field(option.default, description=option.help)


def _model(name: str, names: tuple[str, ...], **extra: tuple[Any, Any]) -> type[BaseModel]:
    return create_model(name, __base__=_Request, **{n: _field(OPTIONS[n]) for n in names}, **extra)


ImageRequest = _model("ImageRequest", IMAGE_OPTIONS)
VideoRequest = _model("VideoRequest", VIDEO_OPTIONS,
                      fps=(int, Field(FPS.default, ge=FPS.minimum, le=FPS.maximum, description=FPS.help)),
                      image=(str | None, Field(None, description=f"{OPTIONS['image'].help}, as a base64 PNG or JPEG")))

__all__ = ["IMAGE_OPTIONS", "ImageRequest", "RUNNER_OPTIONS", "VIDEO_OPTIONS", "VideoRequest"]
