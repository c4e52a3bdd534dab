"""Input images for image-to-video, prepared as the official demo prepares them (torch-free, PIL only).

The official pipeline encodes its `image` as given, so it must already be at the model resolution; its
text-to-video demo (`scripts/app_nova_t2v.py`) gets there from any picture by cutting the largest centred
box of the model's aspect ratio and resizing it bilinearly. `fit_image` repeats those steps, so a picture
of any size gives the pixels the demo would feed the pipeline.
"""

from __future__ import annotations

import numpy as np
import PIL.Image


def fit_image(image: np.ndarray | PIL.Image.Image, height: int, width: int) -> np.ndarray:
    """A picture -> uint8 [height, width, 3]: the centred crop of the target aspect ratio, resized bilinearly.

    `image` is a uint8 [H, W, 3] RGB array or a PIL image (converted to RGB). A picture already at the
    target size comes back as it is: what the official pipeline encodes when called directly."""
    picture = image.convert("RGB") if isinstance(image, PIL.Image.Image) else PIL.Image.fromarray(image)
    w, h = picture.size
    if (h, w) == (height, width):
        return np.array(picture)
    target = width / height
    # The demo's arithmetic: the kept side is truncated to an integer, the offset floored.
    if w / h > target:  # too wide: keep the full height
        keep = int(h * target)
        left = (w - keep) // 2
        picture = picture.crop((left, 0, left + keep, h))
    else:  # too tall, or the target ratio: keep the full width
        keep = int(w / target)
        top = (h - keep) // 2
        picture = picture.crop((0, top, w, top + keep))
    return np.array(picture.resize((width, height), PIL.Image.Resampling.BILINEAR))
