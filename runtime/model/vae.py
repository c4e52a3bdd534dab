"""VAE side of the pipeline: class by config, latent (un)scaling, decode to uint8, image encode.

SDXL-type checkpoints use diffusers' `AutoencoderKL` (same parameter names and maths as the
official class); the video checkpoint uses our `AutoencoderKLOpenSora`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from runtime.configs import is_video_vae


def vae_class(name: str | None, where: Path | str = "vae/config.json"):
    from runtime.model.vae_opensora import AutoencoderKLOpenSora

    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLOpenSora": AutoencoderKLOpenSora}
    if name not in classes:
        raise ValueError(f"{where}: unsupported VAE class {name!r} (expected one of {', '.join(classes)})")
    return classes[name]


def unscale(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Model latents -> VAE latents (official order: multiply by 1/scale, then add the shift)."""
    shift = vae.config.get("shift_factor") or 0.0
    return latents * (1 / vae.config.scaling_factor) + shift


def scale(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    shift = vae.config.get("shift_factor") or 0.0
    return (latents - shift) * vae.config.scaling_factor


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """[B, 3, (T,) H, W] in [-1, 1] -> channels-last uint8, truncating like the official code."""
    order = (0, 2, 3, 4, 1) if pixels.dim() == 5 else (0, 2, 3, 1)
    return (pixels.permute(order) * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, C, T, h, w] -> pixels in [-1, 1], one sample at a time as the official
    pipeline does: [B, 3, H, W] for an image VAE (T must be 1), [B, 3, T', H, W] for the video VAE."""
    vae_latents = unscale(vae, latents.to(vae.dtype))
    if not is_video_vae(vae.config):
        if vae_latents.shape[2] != 1:
            raise ValueError(f"an image VAE decodes one latent frame, got {vae_latents.shape[2]}")
        vae_latents = vae_latents[:, :, 0]
    return torch.cat([vae.decode(sample[None]).sample for sample in vae_latents])


@torch.no_grad()
def encode_image(vae: torch.nn.Module, image: np.ndarray, draws) -> torch.Tensor:
    """uint8 HWC image at the model resolution -> scaled latent [1, C, h, w]: a posterior sample,
    drawn in fp32 from `draws` (a `runtime.draws.RandomDraws`) as the official code does."""
    pixels = torch.as_tensor(image, device=vae.device).to(vae.dtype)
    pixels = ((pixels - 127.5) / 127.5).permute(2, 0, 1).unsqueeze(0)
    posterior = vae.encode(pixels).latent_dist
    mean, std = posterior.mean.float(), posterior.std.float()
    sample = draws.normal(tuple(mean.shape), torch.float32).to(mean.device) * std + mean
    return scale(vae, sample.to(vae.dtype))
