"""The VAE graphs: `vae_decoder` (latents -> uint8 pixels; per temporal window for the video VAE),
`vae_decoder_single` (a 1-latent video) and `vae_encoder` (image-to-video: the first frame's latent)."""

from __future__ import annotations

import torch
from torch import nn

from runtime.decoder import window_length
from runtime.graphs.common import GraphModule
from runtime.graphs.contract import GraphContext, GraphSpec, TensorSpec, dynamic, randn, sources, tensor
from runtime.model import vae as vae_ops

SOURCES = sources(__name__)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, (T,) H, W] in [-1, 1] -> channels-last uint8, truncated like the official `.byte()`
    (an explicit floor, so backends whose float->uint8 cast rounds agree)."""
    order = (0, 2, 3, 4, 1) if pixels.dim() == 5 else (0, 2, 3, 1)
    return (pixels.float().permute(order) * 127.5 + 127.5).clamp(0, 255).floor().to(torch.uint8)


class VAEDecoderGraph(GraphModule):
    """`vae_decoder` / `vae_decoder_single`: scaled latents [B', C, h, w] (image VAE) or [B', C, Tw, h, w]
    (one temporal window of the video VAE, Tw <= 5) -> uint8 pixels [B', H, W, 3] or
    [B', 1 + 4 (Tw - 1), H, W, 3]."""

    def __init__(self, vae: nn.Module, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        with self.islands():
            return to_uint8(self.vae.decode(vae_ops.unscale(self.vae, latents.to(self.compute_dtype))).sample)


def _decoder_spec(ctx: GraphContext, name: str, latents: TensorSpec, pixels: TensorSpec, dims: dict) -> GraphSpec:
    def vae_decoder_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"latents": randn(latents.concrete(values), gen)}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Unscale, decode, x * 127.5 + 127.5, clamp, truncate to uint8 (channels last).",
        inputs=(latents,), outputs=(pixels,), dims=dims, component="vae",
        weight_prefixes=("decoder.", "post_quant_conv."), sources=SOURCES, attention=ctx.attention,
        conv3d=ctx.conv3d if ctx.configs.video_vae else None, sample=vae_decoder_sample,
        build=lambda: VAEDecoderGraph(ctx.module("vae", name), ctx.dtype(name)).eval())


def _batch(ctx: GraphContext) -> tuple[int | str, dict]:
    """VAE graphs decode one sample per call at opt, up to the whole batch."""
    dims = dynamic("vae_batch", 1, ctx.geometry.batch, opt=1)
    return ("vae_batch" if dims else ctx.geometry.batch), dims


def vae_decoder_spec(ctx: GraphContext) -> GraphSpec:
    """Image VAE: one latent frame. Video VAE: windows of up to 5 latents (`runtime.decoder.video_windows`
    tiles longer videos); window sizes 2..5 share one graph with a dynamic time dim."""
    g, (rows, dims) = ctx.geometry, _batch(ctx)
    C, (h, w), (H, W) = g.channels, g.latent_size, g.image_size
    if not ctx.configs.video_vae:
        return _decoder_spec(ctx, "vae_decoder", tensor("latents", "float32", rows, C, h, w),
                             tensor("pixels", "uint8", rows, H, W, 3), dims)
    largest = window_length(g.max_latent_length)
    window_dims = dynamic("window", 2, largest) if largest >= 2 else {}
    window = "window" if window_dims else largest
    frames = "4*window-3" if window_dims else 1 + 4 * (largest - 1)
    return _decoder_spec(ctx, "vae_decoder", tensor("latents", "float32", rows, C, window, h, w),
                         tensor("pixels", "uint8", rows, frames, H, W, 3), {**dims, **window_dims})


def vae_decoder_single_spec(ctx: GraphContext) -> GraphSpec | None:
    """A 1-latent request to a video VAE (an image from the video model) takes the official code's other
    branch (no temporal upsampling): its own graph, where `vae_decoder` serves longer windows."""
    g, (rows, dims) = ctx.geometry, _batch(ctx)
    if not ctx.configs.video_vae or window_length(g.max_latent_length) < 2:
        return None
    return _decoder_spec(ctx, "vae_decoder_single", tensor("latents", "float32", rows, g.channels, 1, *g.latent_size),
                         tensor("pixels", "uint8", rows, 1, *g.image_size, 3), dims)


class VAEEncoderGraph(GraphModule):
    """`vae_encoder`: image [1, H, W, 3] uint8 and noise [1, C, h, w] f32 -> the scaled posterior sample
    [1, C, h, w] f32 (noise * std + mean in fp32, as the official encode)."""

    def __init__(self, vae: nn.Module, compute_dtype: torch.dtype):
        super().__init__(compute_dtype)
        self.vae = vae

    def forward(self, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        with self.islands():
            pixels = ((image.to(self.compute_dtype) - 127.5) / 127.5).permute(0, 3, 1, 2)
            posterior = self.vae.encode(pixels).latent_dist
            sample = noise * posterior.std.float() + posterior.mean.float()
            return vae_ops.scale(self.vae, sample.to(self.compute_dtype)).float()


def vae_encoder_spec(ctx: GraphContext) -> GraphSpec | None:
    g, name = ctx.geometry, "vae_encoder"
    if not (ctx.configs.video_vae and g.video and ctx.profile.image_to_video):
        return None
    (H, W), latent = g.image_size, (1, g.channels, *g.latent_size)

    def vae_encoder_sample(values: dict[str, int], gen: torch.Generator) -> dict[str, torch.Tensor]:
        image = torch.randint(0, 256, (1, H, W, 3), generator=gen, dtype=torch.uint8)
        return {"image": image, "noise": randn(latent, gen)}

    return GraphSpec(
        name=name, precision=ctx.precisions[name],
        doc="Image-to-video: uint8 image -> scaled posterior sample noise * std + mean (noise from the host).",
        inputs=(tensor("image", "uint8", 1, H, W, 3), tensor("noise", "float32", *latent)),
        outputs=(tensor("latent", "float32", *latent),), dims={}, component="vae",
        weight_prefixes=("encoder.", "quant_conv."), sources=SOURCES, attention=ctx.attention, conv3d=ctx.conv3d,
        sample=vae_encoder_sample,
        build=lambda: VAEEncoderGraph(ctx.module("vae", name), ctx.dtype(name)).eval())
