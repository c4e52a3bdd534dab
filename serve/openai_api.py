"""The OpenAI images API over NOVA: `POST /v1/images/generations` takes what a standard OpenAI client sends
(`prompt`, `n`, `size`, `response_format`, `model`) and answers in its response shape. NOVA's own options
ride along as extension fields under the runner's names (`seed`, `negative_prompt`, `num_inference_steps`,
`guidance_scale`, ...; the OpenAI client sends them with `extra_body=`), as vLLM-Omni does."""

from __future__ import annotations

import base64
import time
from typing import Literal

from pydantic import Field

from serve.errors import Refused
from serve.schema import ImageRequest


class ImageGeneration(ImageRequest):
    """An OpenAI images request. `n` is the images of the one prompt (NOVA's num_images_per_prompt); `size`,
    when given, must be the model's resolution ("WIDTHxHEIGHT"), the only one its engines generate."""

    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"


def image_options(body: ImageGeneration, model: dict) -> dict:
    """The NOVA image request of an OpenAI one, for the model `model` (its GET /v1/models entry); `Refused`
    with one sentence for what NOVA cannot answer."""
    if body.response_format == "url":
        raise Refused("response_format 'url' is not served: this service hosts no files; ask for 'b64_json'")
    if body.size is not None and body.size != model["size"]:
        raise Refused(f"size {body.size!r} is not served: model {model['id']!r} generates {model['size']} images")
    if "num_images_per_prompt" in body.model_fields_set:
        raise Refused("give the number of images as n (the OpenAI field), not num_images_per_prompt")
    options = body.model_dump(exclude={"n", "size", "response_format"})
    return {**options, "model": model["id"], "num_images_per_prompt": body.n}


def images_response(pngs: list[bytes]) -> dict:
    """OpenAI's images response: {"created": unix seconds, "data": [{"b64_json": base64 PNG}, ...]}."""
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()} for png in pngs]}
