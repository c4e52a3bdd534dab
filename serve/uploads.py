"""Pictures in requests: the `image` of image-to-video, as a base64 PNG or JPEG string in JSON or as an uploaded
file (a multipart part). Decoded at the ingress, so a broken picture is refused before a replica is asked; the
runner fits it to the model's resolution (`runtime.images.fit_image`) exactly as it fits an array given to a
direct call."""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np


def decode_image(text: str) -> np.ndarray:
    """A base64 PNG or JPEG (optionally a data: URL) -> uint8 [H, W, 3] RGB; ValueError naming the problem."""
    payload = text.partition(",")[2] if text.startswith("data:") else text
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise ValueError("image must be a base64 PNG or JPEG, and is not valid base64") from None
    return read_image(data)


def read_image(data: bytes) -> np.ndarray:
    """The bytes of a PNG or JPEG file -> uint8 [H, W, 3] RGB; ValueError naming the problem."""
    import PIL.Image

    try:
        with PIL.Image.open(io.BytesIO(data)) as picture:
            if picture.format not in ("PNG", "JPEG"):
                raise ValueError(f"image must be a PNG or JPEG, got {picture.format}")
            return np.asarray(picture.convert("RGB"))
    except PIL.UnidentifiedImageError:
        raise ValueError("image must be a PNG or JPEG, and its bytes are neither") from None
    except OSError as error:  # a truncated or corrupt file of either format
        raise ValueError(f"image could not be decoded: {error}") from None
